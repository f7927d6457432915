"""Influence of training examples on test examples (Feldman & Zhang):

    infl(i, j) = mean_{k: i in S_k} t[k, j] - mean_{k: i not in S_k} t[k, j]

with masks [K, N] (i in S_k) and t [K, N_test] the 0/1 test correctness. The in-sums are one
matrix product masks^T @ t; the out-sums are the column totals of t minus the in-sums. Rows
are computed in blocks, so an [N, N_test] result (50,000 x 10,000 for CIFAR: 2 GB in float32)
can go straight to a memory-mapped .npy file.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmem import atomic, estimator, significance
from jaxmem.analysis import stats
from jaxmem.errors import UserError
from jaxmem.estimator import DEFAULT_MIN_COUNT, DEFAULT_THRESHOLD
from jaxmem.rundir import Run

DEFAULT_INFLUENCE_THRESHOLD = 0.15
DEFAULT_BLOCK = 1024  # training examples per block: [block, N_test] float64 intermediates


def influence(masks: np.ndarray, correct_test: np.ndarray, rows: np.ndarray | None = None,
              block_size: int = DEFAULT_BLOCK, out: str | None = None,
              dtype=np.float32, min_count: int = DEFAULT_MIN_COUNT) -> np.ndarray:
    """[n, N_test] influence of training examples `rows` (default all N) on every test example.

    masks [K, N] bool; correct_test [K, N_test] bool. Rows of examples with fewer than
    min_count in- or held-out models are NaN (as their memorization scores are).
    out: path of an .npy file to write the result into (`jaxmem.atomic.open_memmap`); the
    memory-mapped array is returned.
    """
    masks = np.asarray(masks, bool)
    correct_test = np.asarray(correct_test, bool)
    if masks.ndim != 2 or correct_test.ndim != 2 or masks.shape[0] != correct_test.shape[0]:
        raise UserError(f"masks [K,N] and test correctness [K,N_test] must share K, got "
                        f"{masks.shape} and {correct_test.shape}")
    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    rows = np.arange(masks.shape[1]) if rows is None else np.asarray(rows, np.int64)
    num_models = masks.shape[0]
    shape = (len(rows), correct_test.shape[1])
    if out is not None:
        result = atomic.open_memmap(out, shape, dtype)  # a full disk: DiskFull, not SIGBUS
    else:
        result = np.empty(shape, dtype)
    test = correct_test.astype(np.float64)  # [K, N_test]; sums of 0/1 are exact in float64
    total = test.sum(axis=0)  # [N_test]
    for start in range(0, len(rows), block_size):
        members = masks[:, rows[start:start + block_size]].T.astype(np.float64)  # [b, K]
        in_count = members.sum(axis=1, keepdims=True)  # [b, 1]
        out_count = num_models - in_count
        in_correct = members @ test  # [b, N_test]
        with np.errstate(divide="ignore", invalid="ignore"):
            block = in_correct / in_count - (total - in_correct) / out_count
        low = estimator.too_few_models(in_count, out_count, min_count)
        result[start:start + len(members)] = np.where(low, np.nan, block)
    if out is not None:
        result.flush()
    return result


def run_influence(run: Run, rows: np.ndarray | None = None, block_size: int = DEFAULT_BLOCK,
                  out: str | None = None, epoch: int | None = None) -> np.ndarray:
    """Influence for a run directory (last evaluated epoch's test correctness by default)."""
    if epoch is None:
        correct_test = run.correct_test
    else:
        correct_test = run.correct_epochs("test")[run.epoch_position(epoch)]
    return influence(run.masks, correct_test, rows, block_size, out,
                     min_count=stats.run_min_count(run))


@dataclasses.dataclass(frozen=True)
class InfluencePairs:
    """High-influence pairs, highest influence first: train_index, test_index, influence,
    memorization (of the training example), pvalue (the pair's p-value of H0: influence <=
    the influence threshold; NaN when not computed), passes (bool: selected by Benjamini-
    Hochberg at the false discovery rate `fdr` over the family of `num_tests` pairs; False when
    not computed), all [P].

    The family is every (memorized training example, test example) pair, not only the P
    selected on influence: the selection looks at the same data, so correcting among the
    selected alone would understate how many pairs were looked at. A pair left out of the
    selection has influence <= the threshold, hence p >= 1/2, and can never pass at q < 1/2,
    so BH over the selected pairs with m = num_tests equals BH over the whole family.
    """

    train_index: np.ndarray
    test_index: np.ndarray
    influence: np.ndarray
    memorization: np.ndarray
    pvalue: np.ndarray
    passes: np.ndarray
    num_tests: int = 0
    fdr: float | None = None

    def __len__(self) -> int:
        return len(self.train_index)

    def as_records(self, limit: int | None = None) -> list[dict]:
        return [{"train_index": int(i), "test_index": int(j), "influence": float(v),
                 "memorization": float(m), "pvalue": float(p), "passes": bool(a)}
                for i, j, v, m, p, a in list(zip(self.train_index, self.test_index,
                                                 self.influence, self.memorization, self.pvalue,
                                                 self.passes, strict=True))[:limit]]


def high_influence_pairs(infl: np.ndarray, memorization: np.ndarray,
                         influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD,
                         memorization_threshold: float = DEFAULT_THRESHOLD,
                         rows: np.ndarray | None = None) -> InfluencePairs:
    """Pairs (i, j) with infl(i, j) > influence_threshold and mem(i) > memorization_threshold.

    infl [n, N_test] (row r is training example rows[r]; rows default 0..n-1, so a full [N,
    N_test] matrix or a memory map works); memorization [N]. Only rows of memorized examples
    are read.
    """
    memorization = np.asarray(memorization, np.float64)
    rows = np.arange(infl.shape[0]) if rows is None else np.asarray(rows, np.int64)
    memorized = np.flatnonzero(np.nan_to_num(memorization[rows], nan=-np.inf)
                               > memorization_threshold)
    found = []
    for start in range(0, len(memorized), DEFAULT_BLOCK):
        chosen = memorized[start:start + DEFAULT_BLOCK]
        block = np.asarray(infl[chosen], np.float64)
        r, j = np.nonzero(np.nan_to_num(block, nan=-np.inf) > influence_threshold)
        found.append((rows[chosen[r]], j, block[r, j]))
    if found:
        train_index, test_index, values = (np.concatenate(parts) for parts in zip(*found,
                                                                                    strict=True))
    else:
        train_index = test_index = np.zeros(0, np.int64)
        values = np.zeros(0)
    order = np.lexsort((test_index, train_index, -values))
    train_index, test_index, values = train_index[order], test_index[order], values[order]
    return InfluencePairs(train_index.astype(np.int64), test_index.astype(np.int64), values,
                          memorization[train_index], np.full(len(values), np.nan),
                          np.zeros(len(values), bool))


def run_high_influence_pairs(run: Run,
                             influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD,
                             memorization_threshold: float | None = None,
                             block_size: int = DEFAULT_BLOCK) -> InfluencePairs:
    """High-influence pairs of a run, computing influence only for the memorized examples
    (canaries left out), each with its p-value of H0: influence <= influence_threshold and
    whether it passes Benjamini-Hochberg at the run's false discovery rate over every
    (memorized, test) pair (see InfluencePairs)."""
    threshold = stats.run_threshold(run, memorization_threshold)
    memorization = run.counted_scores()
    rows = stats.memorized_set(memorization, threshold)
    infl = run_influence(run, rows, block_size)
    pairs = high_influence_pairs(infl, memorization, influence_threshold, threshold, rows)
    pvalue = significance.pair_pvalues(run.masks, run.correct_test, pairs.train_index,
                                       pairs.test_index, influence_threshold,
                                       stats.run_min_count(run))
    num_tests = len(rows) * run.correct_test.shape[1]
    fdr = stats.run_fdr(run)
    passes = significance.benjamini_hochberg(pvalue, fdr, num_tests) if num_tests else \
        np.zeros(len(pairs), bool)
    return dataclasses.replace(pairs, pvalue=pvalue, passes=passes, num_tests=num_tests, fdr=fdr)


def run_pairs_noise_floor(run: Run, influence_threshold: float = DEFAULT_INFLUENCE_THRESHOLD,
                          memorization_threshold: float | None = None,
                          num_permutations: int | None = None) -> significance.NullCounts:
    """How many high-influence pairs noise alone gives: the count of pairs (last evaluated
    epoch) with membership shuffled across models, memorized set and influence recomputed
    (canaries left out, as in `run_high_influence_pairs`)."""
    real = run.real
    return significance.pairs_null(
        np.asarray(run.masks)[:, real], np.asarray(run.correct_train)[:, real],
        run.correct_test, influence_threshold, stats.run_threshold(run, memorization_threshold),
        stats.run_min_count(run), num_permutations or len(run.extra.get(
            "null_samples_by_epoch", ())) or significance.DEFAULT_PERMUTATIONS,
        int(run.config.get("seed", 0)))
