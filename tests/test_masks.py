import numpy as np
import pytest

from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.masks import subset_masks, subset_size


@pytest.mark.parametrize("num_examples,ratio", [(10, 0.7), (1258, 0.7), (101, 0.5), (7, 0.1)])
def test_subset_sizes_are_exact(num_examples, ratio):
    masks = subset_masks(0, range(6), num_examples, ratio)
    assert masks.shape == (6, num_examples) and masks.dtype == bool
    assert (masks.sum(axis=1) == round(ratio * num_examples)).all()
    assert subset_size(num_examples, ratio) == round(ratio * num_examples)


def test_masks_reproducible_and_seed_dependent():
    a = subset_masks(3, range(8), 500, 0.7)
    np.testing.assert_array_equal(a, subset_masks(3, range(8), 500, 0.7))
    assert (a != subset_masks(4, range(8), 500, 0.7)).any()
    assert len({row.tobytes() for row in a}) == 8  # models differ from each other


def test_model_mask_depends_on_model_index_only():
    full = subset_masks(0, range(10), 300, 0.7)
    # the same models asked for alone, in another order, or inside a larger ensemble
    np.testing.assert_array_equal(subset_masks(0, [7], 300, 0.7)[0], full[7])
    np.testing.assert_array_equal(subset_masks(0, [9, 2, 5], 300, 0.7), full[[9, 2, 5]])
    np.testing.assert_array_equal(subset_masks(0, range(40), 300, 0.7)[:10], full)


def test_each_example_is_held_out_about_one_minus_r_of_the_time():
    masks = subset_masks(0, range(2000), 50, 0.7)
    in_fraction = masks.mean(axis=0)
    assert np.abs(in_fraction - 0.7).max() < 0.05


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.3])
def test_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(UserError, match="subset-ratio"):
        Config(subset_ratio=ratio)
