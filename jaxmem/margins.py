"""True-class margins: what each model's evaluation says about an example beyond right or wrong.

The margin of model k on training example i is its true-class logit minus its largest other
logit: positive exactly when the model is correct, and continuous, so it carries far more than
the one bit the plain estimator reads. A run keeps, at its last evaluated epoch, every model's
margin on every training example, and at every evaluated epoch, per example, the in- and
held-out sums of the margins and of their squares (the sufficient statistics of a normal fit),
so that waves, parts, resumes and grown runs add them exactly.

Stored form: int16 fixed point, `round(margin * SCALE)` clipped to +-LIMIT (a resolution of
1/128 logit and a range of +-256 logits), with the sign of the correctness: a correct model's
margin is at least 1 unit, a wrong one's at most -1, so `quantized > 0` IS the correctness,
ties included (argmax takes the lowest class among equal logits). The sums are int64 sums of
these integers and their squares: exact in any order of summation. At K = 2,000 models and
N = 50,000 examples (CIFAR-10) the margins take 200 MB and the sums of 17 evaluations 27 MB.

Axis letters: K (or m) models, N examples, E evaluated epochs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCALE = 128  # units per logit
LIMIT = 2**15 - 1  # largest magnitude, in units
# The four per-example sums over models, in this order on the sums' second axis.
SUM_NAMES = ("in_sum", "in_sumsq", "out_sum", "out_sumsq")


def quantize(margin, correct, xp=np):
    """Margins (float, any shape) and the matching correctness -> int16 units whose sign is the
    correctness. xp: the array module (numpy, or jax.numpy on a device)."""
    units = xp.clip(xp.rint(margin * SCALE), -LIMIT, LIMIT)
    units = xp.where(correct, xp.maximum(units, 1), xp.minimum(units, -1))
    return units.astype(xp.int16)


def logits(units: np.ndarray) -> np.ndarray:
    """int16 units -> float32 margins in logits."""
    return np.asarray(units, np.float32) / SCALE


@dataclasses.dataclass
class MarginSums:
    """Per evaluated epoch and example, over the included models: `sums` [E, 4, N] int64 in
    SUM_NAMES order (in units and squared units). The counts behind them are the run's
    in_count and out_count."""

    sums: np.ndarray

    @classmethod
    def of(cls, units: np.ndarray, masks: np.ndarray, included: np.ndarray) -> MarginSums:
        """units [E, m, N] int16 margins of m models, masks [m, N] bool, included [m] bool
        (models that count: not diverged)."""
        masks = np.asarray(masks, bool)[included]
        sums = np.zeros((len(units), len(SUM_NAMES), masks.shape[1]), np.int64)
        for epoch, epoch_units in enumerate(units):  # one [m, N] int64 temporary at a time
            values = np.asarray(epoch_units, np.int64)[included]
            for j, (side, power) in enumerate(((masks, 1), (masks, 2), (~masks, 1),
                                               (~masks, 2))):
                sums[epoch, j] = np.where(side, values**power, 0).sum(axis=0)
        return cls(sums)

    def __add__(self, other: MarginSums) -> MarginSums:
        return MarginSums(self.sums + other.sums)

    def named(self) -> dict[str, np.ndarray]:
        """{name: [E, N]} in logits (squares in logits squared), float64."""
        scale = np.array([SCALE, SCALE**2, SCALE, SCALE**2], np.float64)[None, :, None]
        values = self.sums / scale
        return {name: values[:, j] for j, name in enumerate(SUM_NAMES)}


def combine(records: list[dict]) -> MarginSums | None:
    """The `margin_sums` of several records (finished waves, or runs' scores) added; None when
    any lacks them (written before margins were kept)."""
    if not records or any("margin_sums" not in r for r in records):
        return None
    return MarginSums(sum(np.asarray(r["margin_sums"], np.int64) for r in records))
