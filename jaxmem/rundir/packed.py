"""Correctness held bit-packed on the example axis, as the run directory stores it
(`correct_by_epoch.npz`: `np.packbits` on the last axis), from the end of each wave until the
run directory is written, and again when a run is loaded or merged.

At K = 2,000 models, N = 50,000 training and 10,000 test examples, evaluated E = 17 times,
correctness is 2.0 GB as bools and 255 MB packed. Everything computed from it reads it one
epoch, or one block of columns, at a time: the four counts per example (`counts`), each
model's accuracies (`model_counts`, by popcount on the packed bits) and the noise floor (one
epoch unpacked at a time), so no unpacked copy of the whole tensor is ever made.

Axis letters: E evaluated epochs, K models, N examples; B = ceil(N / 8) bytes of bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Unpacked bools of one column block of `counts` (its temporaries are a few times this).
BLOCK_BYTES = 16 * 2**20
# Rows of one block of `unpacked_rows` (writing a [K, N] bool file without a [K, N] copy).
ROW_BLOCK_BYTES = 16 * 2**20
_BYTE_ONES = np.array([bin(byte).count("1") for byte in range(256)], np.uint8)


def packed_bytes(count: int) -> int:
    """Bytes of one model's packed row of `count` examples."""
    return -(-count // 8)


class PackedCorrectness(Sequence):
    """Correctness [E, K, N] bool as bits [E, K, B] uint8, a lazy sequence of E [K, N] bool
    epochs (`self[e]` unpacks one). `models` (row indices) and `examples` (column indices or a
    bool mask) select what it presents, without copying the bits (`select`)."""

    def __init__(self, bits: np.ndarray, count: int, models: np.ndarray | None = None,
                 examples: np.ndarray | None = None):
        if bits.dtype != np.uint8 or bits.ndim != 3 or bits.shape[-1] != packed_bytes(count):
            raise ValueError(f"packed correctness must be [E, K, {packed_bytes(count)}] uint8 "
                             f"for {count} examples, got {bits.dtype} {bits.shape}")
        self.bits, self.count = bits, int(count)
        self._models = None if models is None else _indices(models)
        self._examples = None if examples is None else _indices(examples)

    @classmethod
    def pack(cls, correct) -> PackedCorrectness:
        """[E, K, N] bool (or [K, N]: one epoch) -> packed."""
        correct = np.asarray(correct, bool)
        correct = correct[None] if correct.ndim == 2 else correct
        return cls(np.packbits(correct, axis=-1), correct.shape[-1])

    @classmethod
    def zeros(cls, epochs: int, models: int, count: int) -> PackedCorrectness:
        return cls(np.zeros((epochs, models, packed_bytes(count)), np.uint8), count)

    @classmethod
    def concatenate(cls, parts: Sequence[PackedCorrectness]) -> PackedCorrectness:
        """The parts' models one after another (their bits copied once)."""
        return cls(np.concatenate([p.packed() for p in parts], axis=1), parts[0].count)

    @property
    def shape(self) -> tuple[int, int, int]:
        models = self.bits.shape[1] if self._models is None else len(self._models)
        examples = self.count if self._examples is None else len(self._examples)
        return len(self.bits), models, examples

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, epoch):
        if isinstance(epoch, slice):
            return [self[e] for e in range(*epoch.indices(len(self)))]
        correct = np.unpackbits(self._rows(epoch), axis=-1, count=self.count).view(bool)
        return correct if self._examples is None else correct[:, self._examples]

    def __array__(self, dtype=None, copy=None):
        """The whole [E, K, N] bool tensor (for small runs and tests: 8x the bits)."""
        return np.stack([self[e] for e in range(len(self))]).astype(dtype or bool, copy=False)

    def _rows(self, epoch: int) -> np.ndarray:
        """[K, B] bits of one epoch's presented models (a copy only when models are selected)."""
        return self.bits[epoch] if self._models is None else self.bits[epoch][self._models]

    def packed(self) -> np.ndarray:
        """[E, K, B] bits of the presented models (all examples)."""
        self._whole_rows()
        return self.bits if self._models is None else self.bits[:, self._models]

    def select(self, models=None, examples=None) -> PackedCorrectness:
        """A view of some of the presented models (row indices or a bool mask) and examples."""
        chosen = []
        for mine, given, size in ((self._models, models, self.bits.shape[1]),
                                  (self._examples, examples, self.count)):
            base = np.arange(size) if mine is None else mine
            chosen.append(mine if given is None else base[_indices(given)])
        return PackedCorrectness(self.bits, self.count, *chosen)

    def _whole_rows(self) -> None:
        if self._examples is not None:
            raise ValueError("this needs every example; select models only")

    def counts(self, masks: np.ndarray, epoch: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(in_correct, out_correct) [E, N] int64 (or [N] at one `epoch`): per example, the
        presented models correct on it that train on it (masks [K, N] bool, the presented
        models' rows) and that hold it out. The same numbers as
        `estimator.correct_counts(masks, correct)`, from column blocks of the bits."""
        self._whole_rows()
        masks = np.asarray(masks, bool)
        if masks.shape != self.shape[1:]:
            raise ValueError(f"masks {masks.shape} do not match correctness {self.shape}")
        epochs = range(len(self)) if epoch is None else [epoch]
        in_correct = np.zeros((len(epochs), self.count), np.int64)
        out_correct = np.zeros_like(in_correct)
        width = max(8, BLOCK_BYTES // max(1, masks.shape[0]) // 8 * 8)
        for row, e in enumerate(epochs):
            bits = self._rows(e)
            for start in range(0, self.count, width):
                stop = min(start + width, self.count)
                block = np.unpackbits(bits[:, start // 8:packed_bytes(stop)], axis=-1,
                                      count=stop - start).view(bool)
                inside = np.count_nonzero(block & masks[:, start:stop], axis=0)
                in_correct[row, start:stop] = inside
                out_correct[row, start:stop] = np.count_nonzero(block, axis=0) - inside
        return (in_correct, out_correct) if epoch is None else (in_correct[0], out_correct[0])

    def model_counts(self, masks: np.ndarray | None = None) -> np.ndarray:
        """[E, K] int64: per epoch and presented model, the examples it got right among those
        of its row of masks [K, N] (None: among all), by popcount of the packed bits."""
        self._whole_rows()
        within = None if masks is None else np.packbits(np.asarray(masks, bool), axis=-1)
        counts = np.zeros(self.shape[:2], np.int64)
        for e in range(len(self)):
            bits = self._rows(e)
            if within is not None:
                bits = bits & within
            counts[e] = _BYTE_ONES[bits].sum(axis=-1, dtype=np.int64)
        return counts

    def unpacked_rows(self, epoch: int):
        """Yield one epoch's [k, N] bool rows (all examples) block after block of models: a
        [K, N] file written from them needs no [K, N] copy."""
        self._whole_rows()
        bits = self._rows(epoch)
        step = max(1, ROW_BLOCK_BYTES // max(1, self.count))
        for start in range(0, len(bits), step):
            yield np.unpackbits(bits[start:start + step], axis=-1, count=self.count).view(bool)


def _indices(selection) -> np.ndarray:
    selection = np.asarray(selection)
    return np.flatnonzero(selection) if selection.dtype == bool else selection.astype(np.int64)


def as_packed(correct: np.ndarray) -> np.ndarray:
    """[..., N] bool correctness, or bits already packed from it ([..., ceil(N / 8)] uint8,
    e.g. read from a file written either way) -> the bits."""
    correct = np.asarray(correct)
    return correct if correct.dtype == np.uint8 else np.packbits(correct.astype(bool), axis=-1)
