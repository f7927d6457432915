"""Held-out predictions: for every training example, the softmax probabilities and the predicted
classes of the included models that held it out, at the last evaluated epoch. These are
out-of-sample predictions (what label-error tools such as cleanlab take as `pred_probs`), from
the ~(1 - r) K models of the run that never trained on the example.

They are kept as sums ([N, C] probability sums and [N, C] vote counts), so waves, merged parts
and grown runs combine by adding, never as means of means. The number of models behind an
example's sums is its count of votes, which equals its `out_count` (held-out included models).

Exact sums: each model's probability is rounded to a multiple of QUANTUM = 2^-24 (float32's own
resolution at 1; a change of at most 3e-8) before it is added in float64. Every partial sum is
then a multiple of 2^-24 below 2^29, which float64 holds exactly, so the sums do not depend on
the order of summation (waves, parts, resumes, grown runs): equal models give equal sums, bit for
bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

QUANTUM = 2.0 ** -24
# Bytes of one [models, b, C] float64 temporary of `add` (a wave's models in chunks).
ADD_BLOCK_BYTES = 16 * 2**20
# scores.npz names of the additive sums (what a merge adds) and of what is derived from them
SUM_ARRAYS = ("heldout_prob_sum", "heldout_votes")


@dataclasses.dataclass
class HeldoutSums:
    """prob_sum [N, C] float64: per example the sum of the held-out models' (quantized)
    softmax probabilities; votes [N, C] int32: how many of them predicted each class."""

    prob_sum: np.ndarray
    votes: np.ndarray

    @classmethod
    def zeros(cls, num_examples: int, num_classes: int) -> HeldoutSums:
        return cls(np.zeros((num_examples, num_classes)),
                   np.zeros((num_examples, num_classes), np.int32))

    def add(self, start: int, predicted: np.ndarray, probs: np.ndarray,
            held: np.ndarray) -> None:
        """Add the examples start..start+b of m models: predicted [m, b] classes, probs
        [m, b, C] softmax probabilities, held [m, b] bool (True where the model held the
        example out and is included; everything else, NaN included, adds nothing)."""
        stop = start + predicted.shape[1]
        classes = np.arange(self.votes.shape[1])
        step = max(1, ADD_BLOCK_BYTES // max(1, 8 * probs.shape[1] * probs.shape[2]))
        for first in range(0, len(predicted), step):  # [step, b, C] float64 temporaries
            models = slice(first, first + step)
            inside = held[models, :, None]
            exact = np.rint(np.asarray(probs[models], np.float64) / QUANTUM) * QUANTUM
            self.prob_sum[start:stop] += np.where(inside, exact, 0.0).sum(axis=0)
            self.votes[start:stop] += ((predicted[models, :, None] == classes) & inside).sum(
                axis=0, dtype=np.int32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"heldout_prob_sum": self.prob_sum, "heldout_votes": self.votes}

    def scores(self) -> dict[str, np.ndarray]:
        """scores.npz entries: the sums, and heldout_probs [N, C] (their mean, NaN where no
        model held the example out), suggested_label [N] (-1 there) and
        suggested_label_share [N] (NaN there)."""
        count = self.votes.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.prob_sum / count[:, None]
        label, share = suggested_labels(self.votes, self.prob_sum)
        return {**self.arrays(), "heldout_probs": means, "suggested_label": label,
                "suggested_label_share": share}


def combine(records: list[dict]) -> HeldoutSums | None:
    """The sums of several records (finished waves, or runs' scores) added up; None when any
    of them lacks them (written before held-out predictions were recorded)."""
    if not records or any(name not in r for r in records for name in SUM_ARRAYS):
        return None
    return HeldoutSums(sum(np.asarray(r["heldout_prob_sum"], np.float64) for r in records),
                       sum(np.asarray(r["heldout_votes"], np.int32) for r in records))


def suggested_labels(votes: np.ndarray, prob_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The held-out models' majority class per example and its share of their votes.

    Ties (classes with equally many votes) go to the class with the larger probability sum,
    then to the lowest class index. Examples no model held out: label -1, share NaN."""
    count = votes.sum(axis=1)
    tied = votes == votes.max(axis=1, keepdims=True)
    label = np.where(tied, prob_sum, -np.inf).argmax(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = votes[np.arange(len(votes)), label] / count
    return np.where(count > 0, label, -1).astype(np.int64), np.where(count > 0, share, np.nan)
