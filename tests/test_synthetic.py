"""Ground truth: on planted long-tail data, singletons are memorized, large groups are not."""

import numpy as np

from jaxmem import load_run
from jaxmem.config import Config
from jaxmem.data import load
from jaxmem.data.synthetic import make
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
    data = make(seed=0, sizes=(1, 1, 1, 1, 2, 4, 16))  # 260 examples, 40 singletons
    path = tmp_path / "longtail.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
             y_test=data.y_test)
    config = Config(arch="tiny_cnn", dataset=str(path), num_models=12, subset_ratio=0.5,
                    epochs=20, batch_size=32, lr=0.2, eval_every=10, seed=0, min_count=3,
                    canaries=10, models_per_wave=12)  # one wave; the plan is tested elsewhere
    result = load_run(run(config, str(tmp_path / "run"), progress=False))
    # 10 examples got another label (canaries): they are found, and not counted
    canaries = result.canary_index
    assert len(canaries) == 10 and (result.labels[canaries] != data.y_train[canaries]).all()
    np.testing.assert_array_equal(result.canary_original_label, data.y_train[canaries])
    assert result.metrics["canary_recall"] >= 0.8
    assert result.metrics["memorized_count"] == np.sum(result.counted_scores() > 0.25)
    assert result.metrics["memorized_count"] < np.sum(result.memorization > 0.25)
    real = result.real
    scores, truth = np.where(real, result.memorization, np.nan), data.subpop_size
    singles = np.nanmean(scores[truth == 1])
    large = np.nanmean(scores[truth == 16])
    assert result.metrics["train_acc"] > 0.9  # the models fit their subsets, tails included
    assert np.isfinite(scores[truth == 1]).mean() > 0.8
    assert singles > 0.5, (singles, large)
    assert large < 0.1, (singles, large)
    by_size = [np.nanmean(scores[truth == size]) for size in (1, 2, 4, 16)]
    assert np.all(np.diff(by_size) < 0), by_size  # the rarer, the more memorized
