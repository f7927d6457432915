"""High-influence pairs (training example i memorized, influence(i, j) on test example j above
a threshold): their noise floor under shuffled membership, and per-pair tests.

influence(i, j) = mean_{k: i in S_k} t[k, j] - mean_{k: i not in S_k} t[k, j], computed as
jaxmem.analysis.influence computes it. Axis letters: K models, N training examples, N_test test
examples, R permutations, P pairs.
"""

from __future__ import annotations

import numpy as np

from jaxmem import estimator
from jaxmem.errors import UserError
from jaxmem.significance.margin import margin_pvalues
from jaxmem.significance.null import (
    BLOCK_BYTES,
    DEFAULT_PERMUTATIONS,
    NullCounts,
    PermutedCounts,
    check_masks,
    check_num_permutations,
    null_counts,
    permutations,
)

DEFAULT_INFLUENCE_THRESHOLD = 0.15  # as jaxmem.analysis.influence
PAIR_BLOCK = 1024  # training examples per [block, N_test] influence block, as influence.py


def pair_pvalues(masks, correct_test, train_index, test_index,
                 influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD,
                 min_count: int = estimator.DEFAULT_MIN_COUNT) -> np.ndarray:
    """One-sided p-values of H0: influence(i, j) <= influence_threshold, the score test of
    `margin.margin_pvalues` on the membership column i of masks and the correctness column j of
    correct_test (influence is the same difference of two proportions as a score).

    masks [K, N] bool; correct_test [K, N_test] bool; train_index, test_index integer arrays
    that broadcast to one shape [...] (P pairs). Returns float64 [...], NaN where training
    example i has fewer than min_count in- or held-out models.
    """
    masks = check_masks(masks)
    correct_test = np.asarray(correct_test, bool)
    if correct_test.ndim != 2 or correct_test.shape[0] != masks.shape[0]:
        raise UserError(f"masks [K, N] and test correctness [K, N_test] must share K, got "
                        f"{masks.shape} and {correct_test.shape}")
    try:
        train_index, test_index = np.broadcast_arrays(np.asarray(train_index),
                                                      np.asarray(test_index))
    except ValueError as error:
        raise UserError(f"train_index and test_index do not broadcast together: {error}") \
            from None
    shape = train_index.shape
    train_index, test_index = _indices(train_index, masks.shape[1], "train_index"), \
        _indices(test_index, correct_test.shape[1], "test_index")
    in_count, out_count = estimator.membership_counts(masks)
    total = correct_test.sum(axis=0, dtype=np.int64)
    in_correct = np.empty(len(train_index), np.int64)
    step = max(1, BLOCK_BYTES // (2 * masks.shape[0]))
    for start in range(0, len(train_index), step):
        pairs = slice(start, start + step)
        in_correct[pairs] = (masks[:, train_index[pairs]]
                             & correct_test[:, test_index[pairs]]).sum(axis=0)
    pvalues = margin_pvalues(in_correct, total[test_index] - in_correct, in_count[train_index],
                             out_count[train_index], influence_threshold, min_count)
    return pvalues.reshape(shape)


def _indices(index: np.ndarray, size: int, name: str) -> np.ndarray:
    index = index.ravel()
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise UserError(f"{name} must hold integers, got {index.dtype}")
    if index.size and (index.min() < 0 or index.max() >= size):
        raise UserError(f"{name} must be in [0, {size}), got {index.min()}..{index.max()}")
    return index.astype(np.int64)


def _pair_count(masks, perm, rows, test, total, influence_threshold, min_count) -> int:
    """masks [K, N] bool, with model k given membership row perm[k]; rows [n] training
    examples; test [K, N_test] float32 0/1; total [N_test] float64 (column sums of test)."""
    num_models = masks.shape[0]
    count = 0
    for start in range(0, len(rows), PAIR_BLOCK):
        members = masks[:, rows[start:start + PAIR_BLOCK]][perm].T  # [b, K]
        in_count = members.sum(axis=1, keepdims=True).astype(np.float64)  # [b, 1]
        out_count = num_models - in_count
        # 0/1 sums below 2**24 are exact in float32
        in_correct = (members.astype(np.float32) @ test).astype(np.float64)  # [b, N_test]
        with np.errstate(divide="ignore", invalid="ignore"):
            block = in_correct / in_count - (total - in_correct) / out_count
        low = (in_count < max(min_count, 2)) | (out_count < max(min_count, 2))
        block = np.where(low, np.nan, block).astype(np.float32).astype(np.float64)
        count += int((np.nan_to_num(block, nan=-np.inf) > influence_threshold).sum())
    return count


def pairs_null(masks, correct_train, correct_test,
               influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD,
               memorization_threshold: float = estimator.DEFAULT_THRESHOLD,
               min_count: int = estimator.DEFAULT_MIN_COUNT,
               num_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> NullCounts:
    """The number of high-influence pairs (influence(i, j) > influence_threshold with training
    example i memorized: score > memorization_threshold) under shuffled membership, next to the
    observed number.

    masks [K, N] bool; correct_train [K, N] bool (the epoch whose scores pick the memorized
    examples); correct_test [K, N_test] bool (the same epoch's test correctness). Under each
    permutation (`permutations(K, R, seed)`) both the memorized set and the influence values
    are recomputed with the permuted masks. Returns NullCounts with samples [R] and observed,
    mean, p95 [].

    Cost per permutation: the memorized set (as permutation_null), then a float32 product
    [n, K] @ [K, N_test] over its n memorized examples (few, under the null, once K is large).
    """
    masks = check_masks(masks)
    correct_train = np.asarray(correct_train, bool)
    if correct_train.shape != masks.shape:
        raise UserError(f"training correctness {correct_train.shape} does not match masks "
                        f"{masks.shape} (need one epoch, [K, N])")
    correct_test = np.asarray(correct_test, bool)
    if correct_test.ndim != 2 or correct_test.shape[0] != masks.shape[0]:
        raise UserError(f"masks [K, N] and test correctness [K, N_test] must share K, got "
                        f"{masks.shape} and {correct_test.shape}")
    num_permutations = check_num_permutations(num_permutations)
    perms = np.concatenate([np.arange(masks.shape[0])[None],
                            permutations(masks.shape[0], num_permutations, seed)])
    permuted = PermutedCounts(masks, correct_train[None], perms, memorization_threshold,
                               min_count)
    memorized = np.zeros((len(perms), masks.shape[1]), bool)  # [1 + R, N]
    for start, stop, block in permuted.map(lambda start, stop, memorized: memorized[:, 0]):
        memorized[:, start:stop] = block
    test = correct_test.astype(np.float32)
    total = correct_test.sum(axis=0).astype(np.float64)
    counts = np.array([_pair_count(masks, perm, np.flatnonzero(chosen), test, total,
                                   influence_threshold, min_count)
                       for perm, chosen in zip(perms, memorized, strict=True)], np.int64)
    return null_counts(counts[1:], counts[0], seed)  # row 0: the true membership
