"""A run's finished models held as its run directory holds them (jaxmem/train/finished.py):
waves added in any order, from files written bit-packed or (before) as bools, give one result
in model order."""

import numpy as np

from jaxmem.rundir.record import TIMED_PARTS
from jaxmem.train.finished import FinishedModels

K, N, N_TEST, E, EPOCHS = 7, 19, 5, 2, 3


def wave(rng, first: int, count: int, packed: bool) -> dict:
    correct = rng.random((E, count, N)) < 0.5
    test = rng.random((E, count, N_TEST)) < 0.5
    return {"model_indices": np.arange(first, first + count),
            "correct_train": np.packbits(correct, axis=-1) if packed else correct,
            "correct_test": np.packbits(test, axis=-1) if packed else test,
            "train_loss": rng.random((EPOCHS, count)),
            "train_batch_acc": rng.random((EPOCHS, count)),
            "margins": rng.integers(-99, 99, (count, N)).astype(np.int16),
            "margin_sums": rng.integers(0, 9, (E, 4, N)), "heldout_prob_sum": rng.random((N, 3)),
            "heldout_votes": rng.integers(0, 3, (N, 3)).astype(np.int32),
            "peak_memory_bytes": np.int64(first), **{f"{p}_seconds": 1.0 for p in TIMED_PARTS},
            "bools": (correct, test)}


def test_waves_in_any_order_and_either_format_fill_their_models_rows():
    rng = np.random.default_rng(0)
    indices = np.arange(10, 10 + K)
    masks = rng.random((K, N)) < 0.7
    waves = [wave(rng, 13, 4, packed=True), wave(rng, 10, 3, packed=False)]
    finished = FinishedModels(indices, masks, [2, 3], EPOCHS, N_TEST)
    for arrays in waves:
        finished.add(arrays)
    assert finished.todo() == [] and finished.count == K
    result = finished.result({"plan": 1}, ["cpu"])
    ordered = waves[::-1]
    np.testing.assert_array_equal(result.model_indices, indices)
    assert result.masks is masks  # every model finished: the run's own masks, no copy
    for name, split in (("correct_train", 0), ("correct_test", 1)):
        np.testing.assert_array_equal(np.asarray(getattr(result, name)),
                                      np.concatenate([w["bools"][split] for w in ordered], 1))
    np.testing.assert_array_equal(result.margins, np.concatenate([w["margins"] for w in ordered]))
    np.testing.assert_array_equal(result.train_loss,
                                  np.concatenate([w["train_loss"] for w in ordered], 1))
    np.testing.assert_array_equal(result.margin_sums.sums, sum(w["margin_sums"] for w in waves))
    np.testing.assert_array_equal(result.heldout.votes, sum(w["heldout_votes"] for w in waves))
    assert result.seconds == dict.fromkeys(TIMED_PARTS, 2.0)
    assert result.peak_memory_bytes == [13, 10] and result.memory_plan == {"plan": 1}


def test_a_wave_without_margins_or_sums_leaves_the_run_without_them():
    rng = np.random.default_rng(1)
    finished = FinishedModels(np.arange(K), rng.random((K, N)) < 0.7, [2, 3], EPOCHS, N_TEST)
    old = wave(rng, 0, 3, packed=False)
    for name in ("margins", "margin_sums", "heldout_prob_sum", "heldout_votes"):
        del old[name]
    finished.add(wave(rng, 3, 4, packed=True))
    finished.add(old)
    result = finished.result(None, [])
    assert result.margins is None and result.margin_sums is None and result.heldout is None


def test_the_result_of_the_first_finished_models_when_the_rest_never_trained():
    """--until-se stops early: the result holds the finished models only."""
    rng = np.random.default_rng(2)
    masks = rng.random((K, N)) < 0.7
    finished = FinishedModels(np.arange(K), masks, [2, 3], EPOCHS, N_TEST)
    first = wave(rng, 0, 3, packed=True)
    finished.add(first)
    assert finished.todo() == [3, 4, 5, 6]
    result = finished.result(None, [])
    np.testing.assert_array_equal(result.model_indices, [0, 1, 2])
    np.testing.assert_array_equal(result.masks, masks[:3])
    np.testing.assert_array_equal(np.asarray(result.correct_train), first["bools"][0])
