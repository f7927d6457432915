"""Bit-packed correctness (jaxmem/rundir/packed.py) gives exactly what the bools give: the four
counts per example, per-model accuracies, selections, epochs and rows; and the run directory's
writer, loader and merge hold it packed, never a full unpacked copy (tracemalloc sees numpy's
allocations)."""

import os
import tracemalloc

import numpy as np
import pytest

from jaxmem import estimator, load_run
from jaxmem.config import Config
from jaxmem.rundir import DataInfo, EnsembleResult, PackedCorrectness, merge_runs, write_run
from jaxmem.rundir import packed as packed_lib
from jaxmem.rundir.store import save_rows


def random_correctness(seed=0, epochs=3, models=9, examples=21):
    rng = np.random.default_rng(seed)
    return rng.random((epochs, models, examples)) < 0.6, rng.random((models, examples)) < 0.7


@pytest.mark.parametrize("block", [8, 16, packed_lib.BLOCK_BYTES])
def test_counts_and_model_counts_equal_the_bools(monkeypatch, block):
    correct, masks = random_correctness()
    monkeypatch.setattr(packed_lib, "BLOCK_BYTES", block * masks.shape[0])  # columns per block
    packed = PackedCorrectness.pack(correct)
    assert packed.shape == correct.shape and packed.nbytes == 3 * 9 * 3  # ceil(21 / 8) bytes
    want = estimator.correct_counts(masks, correct)
    for got, expected in zip(packed.counts(masks), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    for got, expected in zip(packed.counts(masks, -1), want, strict=True):
        np.testing.assert_array_equal(got, expected[-1])
    np.testing.assert_array_equal(packed.model_counts(masks), (correct & masks).sum(-1))
    np.testing.assert_array_equal(packed.model_counts(), correct.sum(-1))


def test_selections_epochs_and_rows_equal_the_bools():
    correct, masks = random_correctness(seed=1)
    packed = PackedCorrectness.pack(correct)
    np.testing.assert_array_equal(np.asarray(packed), correct)
    models, examples = np.array([True, False] * 4 + [True]), np.arange(21) % 3 != 0
    view = packed.select(models=models).select(models=[0, 2], examples=examples)
    want = correct[:, np.flatnonzero(models)[[0, 2]]][..., examples]
    assert view.shape == want.shape and len(view) == 3
    for e in range(3):
        np.testing.assert_array_equal(view[e], want[e])
    assert view.bits is packed.bits  # a view: nothing copied
    kept = packed.select(models=models)
    np.testing.assert_array_equal(kept.counts(masks[models])[0],
                                  estimator.correct_counts(masks[models], correct[:, models])[0])
    with pytest.raises(ValueError, match="every example"):
        view.counts(masks[:2])
    joined = PackedCorrectness.concatenate([packed.select(models=[0, 1]), packed.select(
        models=[2])])
    np.testing.assert_array_equal(np.asarray(joined), correct[:, :3])


def test_rows_are_written_as_the_bool_file_they_were_packed_from(tmp_path, monkeypatch):
    correct, _ = random_correctness(seed=2, models=13, examples=37)
    monkeypatch.setattr(packed_lib, "ROW_BLOCK_BYTES", 4 * 37)  # blocks of 4 rows
    path = str(tmp_path / "rows.npy")
    save_rows(path, PackedCorrectness.pack(correct), 1)
    np.testing.assert_array_equal(np.load(path), correct[1])
    assert np.load(path).dtype == bool


# A run of many models, few examples and many evaluations: the shape in which whole-tensor
# copies of the correctness stand out against everything else the writer holds (its per-example
# float64 score arrays grow with E * N, the bools with E * K * N).
K, N, N_TEST, E = 2048, 1000, 200, 32


def large_result(seed=0, models=range(K)):
    rng = np.random.default_rng(seed)
    masks = rng.random((len(models), N)) < 0.7
    correct = rng.random((E, len(models), N)) < np.where(masks, 0.9, 0.5)
    result = EnsembleResult(np.asarray(models), masks, list(range(1, E + 1)), correct,
                            rng.random((E, len(models), N_TEST)) < 0.5,
                            np.ones((E, len(models))), np.ones((E, len(models))))
    return result, correct


SETTINGS = Config(num_models=K, epochs=E, eval_every=1, null_permutations=4).to_dict()
INFO = DataInfo("fake", 10, (8, 8, 1), np.zeros(N, np.int64), np.zeros(N_TEST, np.int64),
                np.arange(N), {})


def peak_bytes(function, *args) -> int:
    """Peak bytes numpy (and Python) allocated while `function` ran, beyond what was held."""
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A part of the run's models written, and the peak the writer added (beyond the result
    it was given)."""
    root = tmp_path_factory.mktemp("packed")
    result, correct = large_result()
    path = str(root / "run")
    peak = peak_bytes(write_run, path, SETTINGS, INFO, result, 1.0, {})
    return path, peak, correct


def test_the_writer_holds_no_unpacked_copy_of_the_correctness(written):
    """The bools are 65 MB: writing (scores, accuracies, noise floor, files) adds 0.6 of that
    (unpacked, the counts alone held two copies: 2.1); what it wrote is what the bools give."""
    path, peak, correct = written
    assert peak < correct.nbytes, peak / correct.nbytes
    run = load_run(path)
    np.testing.assert_array_equal(run.correct_train, correct[-1])
    np.testing.assert_array_equal(run.correct_by_epoch("train"), correct)
    in_correct, _ = estimator.correct_counts(run.masks, correct)
    want = estimator.from_counts(in_correct, correct.sum(1) - in_correct, run.masks.sum(0),
                                 (~run.masks).sum(0), SETTINGS["min_count"])
    np.testing.assert_array_equal(run.memorization_by_epoch, want["memorization"])
    np.testing.assert_array_equal(run.train_acc, (correct & run.masks).sum(-1) / run.masks.sum(-1))


def test_merging_holds_no_unpacked_copy_of_the_correctness(written, tmp_path, monkeypatch):
    """Two parts merged: the loader and the merge keep the correctness packed, adding 0.8 of
    the 65 MB of bools (unpacking the parts and concatenating them added 3.5)."""
    path, _, correct = written
    part = str(tmp_path / "part")
    result, more = large_result(seed=1, models=range(K, K + 64))
    write_run(part, {**SETTINGS, "num_models": K + 64, "model_range": f"{K}:{K + 64}"}, INFO,
              result, 1.0, {})
    out = str(tmp_path / "merged")
    settings = {**SETTINGS, "num_models": K + 64}
    # random masks are not the seed's, nor are the parts' fingerprints those of one run
    monkeypatch.setattr("jaxmem.rundir.merge.check_masks", lambda parts, config: None)
    monkeypatch.setattr("jaxmem.rundir.merge.check_same", lambda *args: None)
    peak = peak_bytes(merge_runs, [path, part], out, False, None, {"fdr": settings["fdr"]})
    assert peak < correct.nbytes, peak / correct.nbytes
    merged = load_run(out)
    np.testing.assert_array_equal(merged.correct_by_epoch("test")[:, K:],
                                  np.asarray(result.correct_test))
    np.testing.assert_array_equal(merged.correct_train, np.concatenate([correct[-1], more[-1]]))
    assert os.path.exists(os.path.join(out, "correct_test.npy"))
