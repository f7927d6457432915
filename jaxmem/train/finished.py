"""The finished models of a run (or part), held as its run directory will hold them until it is
written: one copy of every per-model array, filled in row by row as waves finish.

Each finished wave's correctness is bit-packed (jaxmem/rundir/packed.py) and written into the
rows of its models in [E, K, B] arrays allocated once; the per-example sums (held-out
predictions, margins) are added as they come. So the host never holds the finished waves and
their stack side by side, and the result is in model order whatever order the waves (or a
resume's finished files) came in. Axis letters: E evaluated epochs, K models of the run, N
training examples, B = ceil(N / 8).
"""

from __future__ import annotations

import numpy as np

from jaxmem import estimator
from jaxmem.canaries import real_examples
from jaxmem.margins import MarginSums
from jaxmem.rundir import EnsembleResult, PackedCorrectness, Run, diverged_models
from jaxmem.rundir.heldout import SUM_ARRAYS, HeldoutSums
from jaxmem.rundir.packed import as_packed
from jaxmem.rundir.record import TIMED_PARTS


class FinishedModels:
    """The results of the models `indices` (consecutive) finished so far; masks [K, N] their
    subsets. `add` takes a finished wave's arrays (as `Trainer.train_wave` returns them, or a
    finished file holds them), `todo` lists the models still to train, `result` is the
    EnsembleResult of the finished ones. prior: a finished run these models are added to
    (its models count towards --until-se)."""

    def __init__(self, indices: np.ndarray, masks: np.ndarray, eval_epochs: list[int],
                 epochs: int, num_test: int, prior: Run | None = None):
        num_models, num_train = masks.shape
        self.indices, self.masks, self.eval_epochs = np.asarray(indices), masks, eval_epochs
        self.correct_train = PackedCorrectness.zeros(len(eval_epochs), num_models, num_train)
        self.correct_test = PackedCorrectness.zeros(len(eval_epochs), num_models, num_test)
        self.margins: np.ndarray | None = np.zeros((num_models, num_train), np.int16)
        self.margin_sums: MarginSums | None = MarginSums(
            np.zeros((len(eval_epochs), 4, num_train), np.int64))
        self.heldout: HeldoutSums | None = None
        self._heldout_missing = False
        self.train_loss = np.zeros((epochs, num_models))
        self.train_batch_acc = np.zeros((epochs, num_models))
        self.seconds = dict.fromkeys(TIMED_PARTS, 0.0)
        self.peak_memory_bytes: list[int | None] = []  # per wave, in the order added
        self.done = np.zeros(num_models, bool)
        self.prior_models = 0 if prior is None else len(prior.model_indices)
        self._prior = None if prior is None else last_epoch_counts(
            np.asarray(prior.masks), prior.correct_epochs())

    def rows_of(self, models) -> slice:
        """The rows of consecutive model indices."""
        first = int(models[0]) - int(self.indices[0])
        return slice(first, first + len(models))

    def add(self, wave: dict) -> None:
        """A finished wave: model_indices [m] (consecutive), correct_train [E, m, N] and
        correct_test [E, m, N_test] (bool, or packed), train_loss and train_batch_acc
        [epochs, m], margins [m, N] and margin_sums [E, 4, N], the held-out sums and the
        seconds per part and peak memory."""
        rows = self.rows_of(wave["model_indices"])
        self.correct_train.bits[:, rows] = as_packed(wave["correct_train"])
        self.correct_test.bits[:, rows] = as_packed(wave["correct_test"])
        self.train_loss[:, rows] = wave["train_loss"]
        self.train_batch_acc[:, rows] = wave["train_batch_acc"]
        if "margins" in wave and self.margins is not None:
            self.margins[rows] = wave["margins"]
        else:  # finished before margins were kept: the run has none
            self.margins = None
        if "margin_sums" in wave and self.margin_sums is not None:
            self.margin_sums.sums += np.asarray(wave["margin_sums"], np.int64)
        else:
            self.margin_sums = None
        self._add_heldout(wave)
        for part in TIMED_PARTS:
            self.seconds[part] += float(wave[f"{part}_seconds"])
        peak = int(wave["peak_memory_bytes"])
        self.peak_memory_bytes.append(peak if peak >= 0 else None)
        self.done[rows] = True

    def _add_heldout(self, wave: dict) -> None:
        if self._heldout_missing or any(name not in wave for name in SUM_ARRAYS):
            self._heldout_missing, self.heldout = True, None
            return
        sums = HeldoutSums(np.array(wave["heldout_prob_sum"], np.float64),  # copies: added to
                           np.array(wave["heldout_votes"], np.int32))
        if self.heldout is None:
            self.heldout = sums
        else:
            self.heldout.prob_sum += sums.prob_sum
            self.heldout.votes += sums.votes

    @property
    def count(self) -> int:
        return int(self.done.sum())

    def todo(self) -> list[int]:
        return [int(k) for k in self.indices[~self.done]]

    def result(self, memory_plan: dict | None, devices: list[str]) -> EnsembleResult:
        """The finished models' EnsembleResult, in model order (views of the rows, copies only
        when --until-se left a gap before the last finished model)."""
        rows = np.flatnonzero(self.done)
        picked = slice(0, len(rows)) if np.array_equal(rows, np.arange(len(rows))) else rows
        packed = lambda c: PackedCorrectness(c.bits[:, picked], c.count)  # noqa: E731
        everything = len(rows) == len(self.done)
        return EnsembleResult(
            self.indices[picked], self.masks if everything else self.masks[picked],
            self.eval_epochs, packed(self.correct_train), packed(self.correct_test),
            self.train_loss[:, picked], self.train_batch_acc[:, picked], dict(self.seconds),
            devices, list(self.peak_memory_bytes), memory_plan=memory_plan,
            heldout=self.heldout,
            margins=None if self.margins is None else self.margins[picked],
            margin_sums=self.margin_sums)

    def standard_errors_below(self, target: float, min_count: int, canary_index=()) -> bool:
        """Is every real example's (canaries left out) standard error at the last evaluated
        epoch below `target`, over the included finished models and those of the prior run?
        Never before any model here has finished."""
        if not self.done.any():
            return False
        rows = np.flatnonzero(self.done)[~diverged_models(self.train_loss[:, self.done])]
        counts = last_epoch_counts(self.masks[rows], self.correct_train.select(models=rows))
        if self._prior is not None:
            counts = [a + b for a, b in zip(counts, self._prior, strict=True)]
        real = real_examples(self.masks.shape[1], canary_index)
        in_count, out_count, in_correct, out_correct = (c[real] for c in counts)
        scores = estimator.from_counts(in_correct, out_correct, in_count, out_count, min_count)
        return not scores["low_count"].any() and np.nanmax(scores["memorization_se"]) < target


def last_epoch_counts(masks: np.ndarray, correct: PackedCorrectness) -> list[np.ndarray]:
    """[in_count, out_count, in_correct, out_correct] [N] of the models of masks [K, N] at the
    last evaluated epoch."""
    return [*estimator.membership_counts(masks), *correct.counts(masks, -1)]
