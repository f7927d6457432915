"""The noise floor of memorization counts: the memorized count when membership is shuffled across
models (the permutation null), computed exactly on a bit-packed model axis.

With K models an example that nobody memorizes but that is learned about half the time has a
score whose noise is ~0.5 / sqrt(K r (1 - r)) (r the subset ratio): 0.22 at K = 24, so ~13% of
such examples cross the 0.25 threshold by chance. A memorized count means something only next to
the count that noise alone gives, which this module measures.

Axis letters: K models, N training examples, E evaluated epochs, R permutations (W 64-model
words of the bit-packed model axis).

The permutation null gives model k the membership row of model perm[k] (the rows of masks are
shuffled across models) and recomputes every score with the same estimator
(`jaxmem.estimator.from_counts`). The examples keep their in- and held-out counts (a
column sum of the masks), every model keeps a subset of the same size, and each model keeps its
own correctness (so whatever the models share, e.g. a better model being right more often,
stays in the null); only the link between membership and correctness is broken.

Pure numpy: no jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import operator
import os
from collections.abc import Sequence

import numpy as np

from jaxmem import estimator
from jaxmem.errors import UserError

DEFAULT_PERMUTATIONS = 100
# Column blocks of the permutation null keep each of their per-thread temporaries (a [K, n] bool
# block of masks, an [E, W, n] uint64 block of packed words) below this size.
BLOCK_BYTES = 16 * 2**20
MAX_WORKERS = 8  # threads over column blocks (numpy releases the GIL in the heavy calls)
WORD = 64  # models per packed word


@dataclasses.dataclass(frozen=True)
class NullCounts:
    """A count under shuffled membership (the permutation null) next to the observed count.

    samples [R] or [R, E] int64 (the count under each permutation); observed [] or [E] int64
    (the count with the true membership); mean and p95 [] or [E] float64 (the mean and the 95th
    percentile of the samples, numpy's default linear interpolation; NaN when R = 0, a run with
    fewer than 2 included models, which has nothing to shuffle); num_permutations R; seed
    (permutation r is the r-th `rng.permutation(K)` of `numpy.random.default_rng(seed)`).
    """

    samples: np.ndarray
    observed: np.ndarray
    mean: np.ndarray
    p95: np.ndarray
    num_permutations: int
    seed: int

    @property
    def pvalue(self) -> np.ndarray:
        """[] or [E] one-sided permutation p-value of the observed count,
        (1 + #{samples >= observed}) / (1 + R)."""
        return (1.0 + (self.samples >= self.observed).sum(axis=0)) / (1.0 + len(self.samples))

    def as_dict(self) -> dict:
        """JSON-ready: plain numbers ([E] arrays become lists). The samples are left out."""
        return {"observed": _plain(self.observed, int), "mean": _plain(self.mean, float),
                "p95": _plain(self.p95, float), "pvalue": _plain(self.pvalue, float),
                "num_permutations": int(self.num_permutations), "seed": int(self.seed)}


def _plain(values, kind):
    """Plain numbers (NaN, e.g. the mean of no samples, becomes None)."""
    values = np.asarray(values)
    if values.ndim:
        return [_plain(v, kind) for v in values]
    return None if np.isnan(values) else kind(values)


def null_counts(samples: np.ndarray, observed: np.ndarray, seed: int) -> NullCounts:
    """NullCounts from the counts under R permutations, samples [R, ...], and the observed
    count [...] (e.g. as a run directory stores them)."""
    samples = np.asarray(samples, np.int64)
    if not len(samples):  # no permutations (fewer than 2 models): no floor
        nothing = np.full(samples.shape[1:], np.nan)
        return NullCounts(samples, np.asarray(observed, np.int64), nothing, nothing, 0, int(seed))
    return NullCounts(samples, np.asarray(observed, np.int64),
                      samples.mean(axis=0).astype(np.float64),
                      np.percentile(samples, 95, axis=0).astype(np.float64),
                      len(samples), int(seed))


# ------------------------------------------------------------------------------------ inputs


def check_masks(masks) -> np.ndarray:
    masks = np.asarray(masks, bool)
    if masks.ndim != 2 or 0 in masks.shape:
        raise UserError(f"masks must be [K, N] with K, N >= 1, got shape {masks.shape}")
    return masks


def check_num_permutations(num_permutations) -> int:
    try:
        value = operator.index(num_permutations)
    except TypeError:
        value = None
    if value is None or isinstance(num_permutations, bool) or value < 1:
        raise UserError(f"num_permutations must be an integer >= 1, got {num_permutations!r}")
    return value


def permutations(num_models: int, num_permutations: int = DEFAULT_PERMUTATIONS,
                 seed: int = 0) -> np.ndarray:
    """[R, K] int64: R permutations of the K models, the r-th `rng.permutation(K)` of
    `numpy.random.default_rng(seed)` (model k of permutation r gets membership row perm[r, k])."""
    num_permutations = check_num_permutations(num_permutations)
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_models) for _ in range(num_permutations)])


def _check_permutations(perms, num_models: int) -> np.ndarray:
    perms = np.asarray(perms, np.int64)
    if perms.ndim != 2 or perms.shape[1] != num_models or not len(perms):
        raise UserError(f"permutations must be [R, K] with R >= 1 and K = {num_models}, got "
                        f"shape {perms.shape}")
    if not (np.sort(perms, axis=1) == np.arange(num_models)).all():
        raise UserError("every row of permutations must be a permutation of 0..K-1")
    return perms


# ------------------------------------------------------------- bit-packed permutation counts
#
# in_correct[r, e, i] = sum_k masks[perm[r, k], i] correct[e, k, i] differs per example in both
# factors, so it is no product with a shared operand (unlike a bootstrap's [R, K] model
# multiplicities, experiments/benchmarks/count_intervals.py): as float32 matrices it is one small
# [R, K] @ [K, E] product per example, which numpy runs ~40x below BLAS speed. Instead the model
# axis is bit-packed, 64 models a word, and each count is the popcount of (permuted masks AND
# correctness) summed over the W = ceil(K / 64) words: R*E*N*W word operations, the correctness
# packed once (E*K*N/8 bytes), the masks re-packed once per permutation. Exact integers.


def _pack_models(block: np.ndarray) -> np.ndarray:
    """block [64 W, n] bool, n a multiple of 8, C-contiguous -> [W, n] uint64: word (w, i) holds
    the bits of models 64w..64w+63 of column i (in an order fixed by this function alone, so
    the popcount of two packed blocks ANDed is the number of models set in both)."""
    rows, n = block.shape
    eights = block.view(np.uint64).reshape(rows // 8, 8, n // 8)  # bytes are 0/1: 8 columns
    packed = eights[:, 0].copy()
    shifted = np.empty_like(packed)
    for bit in range(1, 8):  # byte (q, i), bit j: model 8q + j (no carry: each byte is 0 or 1)
        np.left_shift(eights[:, bit], np.uint64(bit), out=shifted)
        packed |= shifted
    octets = packed.view(np.uint8).reshape(rows // WORD, 8, n)  # [W, 8, n] bytes
    return np.ascontiguousarray(octets.transpose(0, 2, 1)).view(np.uint64).reshape(-1, n)


class PermutedCounts:
    """Memorized indicators of every permuted ensemble, in column blocks.

    masks [K, N] bool; correct: E epochs of [K, N] bool (read once each, bit-packed: E*K*N/8
    bytes kept); perms [R, K]. `memorized(start, stop)` -> [R, E, n] bool, equal to
    `memorization_scores(masks[perm], correct[e])["memorization"] > threshold` (NaN never).
    """

    def __init__(self, masks, correct: Sequence, perms, threshold: float, min_count: int):
        self.masks = masks
        self.num_models, self.num_examples = masks.shape
        self.threshold, self.min_count = float(threshold), int(min_count)
        self.rows = -(-self.num_models // WORD) * WORD
        words = self.rows // WORD
        self.perms = np.concatenate(  # padding rows (all False) stay in place
            [perms, np.broadcast_to(np.arange(self.num_models, self.rows),
                                    (len(perms), self.rows - self.num_models))], axis=1)
        self.in_count, self.out_count = estimator.membership_counts(masks)
        num_epochs = len(correct)
        per_column = max(self.rows, num_epochs * words * 8, len(perms) * num_epochs)
        self.block = max(8, BLOCK_BYTES // per_column // 8 * 8)
        padded = -(-self.num_examples // 8) * 8
        self.words = np.zeros((num_epochs, words, padded), np.uint64)
        self.total = np.zeros((num_epochs, self.num_examples), np.int64)  # correct models
        for epoch in range(num_epochs):
            array = estimator.epoch_of(correct, epoch, masks.shape)
            self.total[epoch] = array.sum(axis=0, dtype=np.int64)
            for start in range(0, self.num_examples, self.block):
                stop = min(start + self.block, self.num_examples)
                self.words[epoch, :, start:start + _ceil8(stop - start)] = _pack_models(
                    self._padded(array, start, stop))
        self.sum_dtype = np.uint16 if self.num_models < 2**16 else np.int64

    def _padded(self, array, start: int, stop: int) -> np.ndarray:
        block = np.zeros((self.rows, _ceil8(stop - start)), bool)
        block[:self.num_models, :stop - start] = array[:, start:stop]
        return block

    def starts(self) -> range:
        return range(0, self.num_examples, self.block)

    def memorized(self, start: int, stop: int) -> np.ndarray:
        n, width = stop - start, _ceil8(stop - start)
        masks = self._padded(self.masks, start, stop)
        words = np.ascontiguousarray(self.words[:, :, start:start + width])  # [E, W, n]
        both = np.empty_like(words[0])  # [W, n]: one epoch at a time stays in cache
        ones = np.empty(both.shape, np.uint8)
        in_correct = np.empty((len(words), width), self.sum_dtype)
        total = self.total[:, start:stop]
        in_count, out_count = self.in_count[start:stop], self.out_count[start:stop]
        result = np.empty((len(self.perms), len(words), n), bool)
        for r, perm in enumerate(self.perms):
            permuted = _pack_models(masks[perm])  # fancy indexing: ~3x np.take's speed here
            for epoch, correct in enumerate(words):
                np.bitwise_and(permuted, correct, out=both)
                _ones(both, ones, in_correct[epoch])
            counts = in_correct[:, :n].astype(np.int64)
            memorization = estimator.from_counts(counts, total - counts, in_count,
                                                  out_count, self.min_count)["memorization"]
            result[r] = above(memorization, self.threshold)
        return result

    def map(self, function):
        """[(start, stop, function(start, stop, memorized [R, E, n]))] over the column blocks,
        computed by up to MAX_WORKERS threads."""
        def one(start):
            stop = min(start + self.block, self.num_examples)
            return start, stop, function(start, stop, self.memorized(start, stop))
        workers = min(MAX_WORKERS, cpus(), len(self.starts()))
        if workers <= 1:
            return [one(start) for start in self.starts()]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, self.starts()))


_BYTE_ONES = np.array([bin(byte).count("1") for byte in range(256)], np.uint8)


def _ones(words: np.ndarray, buffer: np.ndarray, out: np.ndarray) -> None:
    """words [W, n] uint64 -> out [n]: the number of set bits of each column's W words
    (buffer [W, n] uint8 scratch)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        np.bitwise_count(words, out=buffer)
        np.add.reduce(buffer, axis=0, dtype=out.dtype, out=out)
    else:
        ones = _BYTE_ONES[words.view(np.uint8)].reshape(*words.shape, 8)
        np.add.reduce(ones, axis=(0, 2), dtype=out.dtype, out=out)


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def above(memorization: np.ndarray, threshold: float) -> np.ndarray:
    """Scores above threshold, NaN never: the test of scores.memorized_count."""
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(memorization, nan=-np.inf) > threshold


def permuted_counts(masks, correct, perms, threshold: float = estimator.DEFAULT_THRESHOLD,
                    min_count: int = estimator.DEFAULT_MIN_COUNT) -> np.ndarray:
    """Memorized counts of the ensembles with shuffled membership rows.

    masks [K, N] bool; correct [K, N] or [E, K, N] bool, or a sequence of E [K, N] arrays;
    perms [R, K] (model k of permutation r gets membership row perms[r, k]). Returns [R] or
    [R, E] int64, equal to `memorized_count(memorization_scores(masks[perm], correct[e])
    ["memorization"], threshold)` for every permutation and epoch.
    """
    masks = check_masks(masks)
    correct, single = estimator.as_epochs(correct, masks.shape)
    perms = _check_permutations(perms, masks.shape[0])
    counts = _counts(PermutedCounts(masks, correct, perms, threshold, min_count))
    return counts[:, 0] if single else counts


def _counts(permuted: PermutedCounts) -> np.ndarray:
    blocks = permuted.map(lambda start, stop, memorized: memorized.sum(axis=-1, dtype=np.int64))
    return sum(counts for _, _, counts in blocks)


def permutation_null(masks, correct, threshold: float = estimator.DEFAULT_THRESHOLD,
                     min_count: int = estimator.DEFAULT_MIN_COUNT,
                     num_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> NullCounts:
    """The memorized count (scores above threshold) under shuffled membership, next to the
    observed one.

    masks [K, N] bool; correct [K, N] or [E, K, N] bool, or a sequence of E [K, N] arrays
    (anything with len() and [e], e.g. jaxmem.rundir.PackedEpochs: each epoch is read
    once). The membership rows are shuffled across the models R times (`permutations(K, R,
    seed)`) and every score is recomputed with the same estimator. Returns NullCounts with
    samples [R] (or [R, E]) and observed, mean, p95 [] (or [E]).

    Cost: R*E*N*ceil(K/64) 64-bit word operations plus R re-packings of the masks, on up to
    MAX_WORKERS threads; memory E*K*N/8 bytes for the packed correctness plus bounded blocks.
    Measured at K = 2,000, N = 50,000, E = 20, R = 100 on a 2-CPU machine: 66 s, where the
    R*E estimator passes would take ~2,150 s (and a bootstrap over models of the same R, as
    products of multiplicities, 104 s).
    """
    masks = check_masks(masks)
    correct, single = estimator.as_epochs(correct, masks.shape)
    num_permutations = check_num_permutations(num_permutations)
    perms = np.concatenate([np.arange(masks.shape[0])[None],
                            permutations(masks.shape[0], num_permutations, seed)])
    counts = _counts(PermutedCounts(masks, correct, perms, threshold, min_count))
    counts = counts[:, 0] if single else counts  # row 0: the true membership
    return null_counts(counts[1:], counts[0], seed)
