"""The Feldman & Zhang memorization estimator and its standard error.

mem(i) = mean_{k: i in S_k} c[k,i] - mean_{k: i not in S_k} c[k,i]
with c the 0/1 correctness of model k on example i. Everything is computed from four counts per
example, so waves, devices and merged parts add up exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmem.errors import UserError

DEFAULT_THRESHOLD = 0.25
DEFAULT_MIN_COUNT = 5  # fewer in- or held-out models than this: the score is NaN, and flagged


def membership_counts(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """masks [K, N] bool -> (in_count [N], out_count [N]) int64."""
    masks = np.asarray(masks, bool)
    in_count = masks.sum(axis=0, dtype=np.int64)
    return in_count, masks.shape[0] - in_count


def correct_counts(masks: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """masks, correct [..., K, N] bool -> (in_correct, out_correct) [..., N] int64."""
    masks, correct = np.asarray(masks, bool), np.asarray(correct, bool)
    in_correct = (correct & masks).sum(axis=-2, dtype=np.int64)
    out_correct = (correct & ~masks).sum(axis=-2, dtype=np.int64)
    return in_correct, out_correct


def from_counts(in_correct, out_correct, in_count, out_count,
                min_count: int = DEFAULT_MIN_COUNT) -> dict[str, np.ndarray]:
    """Scores from counts. in_correct/out_correct [..., N]; in_count/out_count [N].

    Returns memorization and memorization_se ([..., N] float64, NaN where `low_count`),
    and low_count [N] bool (fewer than min_count in- or held-out models).
    The standard error is that of a difference of two independent Bernoulli means, each with
    the unbiased variance: sqrt(p_in(1-p_in)/(n_in-1) + p_out(1-p_out)/(n_out-1)). It is 0 when
    every in-model and every held-out model agree (p_in and p_out each 0 or 1): a plug-in
    estimate, not a confidence statement; for that, use the per-example test of H0: score <=
    threshold (`jaxmem.significance.margin_pvalues`), whose variance comes from the null.
    """
    in_count = np.asarray(in_count, np.float64)
    out_count = np.asarray(out_count, np.float64)
    low_count = too_few_models(in_count, out_count, min_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_in = np.asarray(in_correct, np.float64) / in_count
        p_out = np.asarray(out_correct, np.float64) / out_count
        memorization = p_in - p_out
        se = np.sqrt(p_in * (1 - p_in) / (in_count - 1) + p_out * (1 - p_out) / (out_count - 1))
    memorization = np.where(low_count, np.nan, memorization)
    se = np.where(low_count, np.nan, se)
    return {"memorization": memorization, "memorization_se": se, "low_count": low_count}


def too_few_models(in_count, out_count, min_count: int = DEFAULT_MIN_COUNT) -> np.ndarray:
    """[N] bool: fewer than min_count (>= 2, so that a standard error exists) in- or held-out
    models; such an example's score is NaN."""
    if min_count < 2:
        raise UserError(f"min_count must be >= 2 (a standard error needs two in- and two "
                        f"held-out models), got {min_count}")
    return (np.asarray(in_count) < min_count) | (np.asarray(out_count) < min_count)


def memorization_scores(masks, correct, min_count: int = DEFAULT_MIN_COUNT):
    """Direct form: masks [K, N] bool, correct [..., K, N] bool -> from_counts(...) dict."""
    in_count, out_count = membership_counts(masks)
    in_correct, out_correct = correct_counts(masks, correct)
    return from_counts(in_correct, out_correct, in_count, out_count, min_count)


def memorized_count(memorization: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Number of examples with score above threshold (NaN never counts); [..., N] -> [...]."""
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(memorization, nan=-np.inf) > threshold).sum(axis=-1)


def as_epochs(correct, shape: tuple[int, int] | None = None) -> tuple[Sequence[np.ndarray], bool]:
    """[K, N] or [E, K, N] array, or a sequence of E [K, N] arrays (anything with len() and
    [e], e.g. a run's lazily unpacked epochs) -> (per-epoch sequence, single). With `shape`
    ([K, N] of the masks), an array's shape is checked here, a sequence's items when they are
    read (`epoch_of`)."""
    if isinstance(correct, np.ndarray) or not isinstance(correct, Sequence):
        correct = np.asarray(correct, bool)
        if shape is not None and (correct.shape[-2:] != shape or correct.ndim not in (2, 3)):
            raise UserError(f"correctness {correct.shape} does not match masks {shape} (need "
                            f"[K, N] or [E, K, N])")
        return (correct[None], True) if correct.ndim == 2 else (correct, False)
    if not len(correct):
        raise UserError("correctness has no epochs")
    return correct, False


def epoch_of(correct: Sequence, epoch: int, shape: tuple[int, int]) -> np.ndarray:
    array = np.asarray(correct[epoch], bool)
    if array.shape != shape:
        raise UserError(f"correctness of epoch {epoch} {array.shape} does not match masks {shape}")
    return array
