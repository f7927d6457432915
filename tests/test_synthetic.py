"""Ground truth: on planted long-tail data, singletons are memorized, large groups are not."""

import numpy as np

from jaxmem import load_run
from jaxmem.config import Config
from jaxmem.data import load
from jaxmem.train.runner import run


def test_synthetic_data_has_the_planted_structure():
    data = load("synthetic")
    sizes, counts = np.unique(data.subpop_size, return_counts=True)
    # every sub-population of size s contributes s examples: counts are multiples of s
    assert (counts % sizes == 0).all()
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (8, 8, 1)
    assert data.num_test == (counts // sizes).sum()  # one test example per sub-population
    assert set(np.unique(data.y_train)) == set(range(data.num_classes))


def test_singletons_score_far_above_large_subpopulations(tmp_path):
    config = Config(arch="tiny_cnn", dataset="synthetic", num_models=20, epochs=16,
                    batch_size=128, lr=0.2, eval_every=8, seed=0, min_count=3)
    result = load_run(run(config, str(tmp_path / "run"), progress=False))
    truth = load("synthetic").subpop_size
    scores = result.memorization
    singles = np.nanmean(scores[truth == 1])
    large = np.nanmean(scores[truth >= 16])
    assert result.metrics["train_acc"] > 0.9  # the models fit their subsets, tails included
    assert singles > 0.5, (singles, large)
    assert large < 0.1, (singles, large)
    assert singles - large > 0.5
