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
# Bytes of one [models, N] int64 block of the sums' temporaries (a wave's models in chunks).
SUM_BLOCK_BYTES = 16 * 2**20


def quantize(margin, correct, xp=np):
    """Margins (float, any shape) and the matching correctness -> int16 units whose sign is the
    correctness. xp: the array module (numpy, or jax.numpy on a device)."""
    units = xp.clip(xp.rint(xp.nan_to_num(margin * SCALE)), -LIMIT, LIMIT)  # NaN: diverged
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
        masks = np.asarray(masks, bool)
        rows = np.flatnonzero(included)
        sums = np.zeros((len(units), len(SUM_NAMES), masks.shape[1]), np.int64)
        step = max(1, SUM_BLOCK_BYTES // (8 * max(1, masks.shape[1])))
        for epoch, epoch_units in enumerate(units):  # [chunk, N] int64 temporaries
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                values, inside = np.asarray(epoch_units[chunk], np.int64), masks[chunk]
                for j, (side, power) in enumerate(((inside, 1), (inside, 2), (~inside, 1),
                                                   (~inside, 2))):
                    sums[epoch, j] += np.where(side, values**power, 0).sum(axis=0)
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


# ------------------------------------------------------------------ the model-based estimate


@dataclasses.dataclass(frozen=True)
class NormalFits:
    """Per example, normal fits of one side's margins (in-subset models, or held-out ones):
    count [..., N] models, mean [..., N] and the moderated variance [..., N] (logits^2), with
    dof [..., N] its degrees of freedom (the sample's plus the prior's)."""

    count: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    dof: np.ndarray

    def correct_probability(self) -> tuple[np.ndarray, np.ndarray]:
        """(P[margin > 0] under the fit, its standard error by the delta method), NaN where no
        model is on this side."""
        from scipy.special import ndtr, owens_t

        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = self.mean / np.sqrt(self.variance)
            # Var[Phi(X)] for X ~ N(t, v), v the variance of t's estimate: E[Phi(X)] =
            # Phi(h) and E[Phi(X)^2] = Phi(h) - 2 T(h, 1 / sqrt(1 + 2 v)) (Owen's T) with
            # h = t / sqrt(1 + v); bounded where the delta method's linearisation is not
            v = _ratio_variance(t, self.count, self.dof)
            h = t / np.sqrt(1 + v)
            spread = ndtr(h) * (1 - ndtr(h)) - 2 * owens_t(h, 1 / np.sqrt(1 + 2 * v))
            se = np.sqrt(np.maximum(spread, 0.0))
            probability = ndtr(t)
        missing = self.count < 1
        return np.where(missing, np.nan, probability), np.where(missing, np.nan, se)


def _ratio_variance(t, count, dof):
    """Variance of t_hat = mean_hat / sd_hat, the fitted standardised margin, when the mean of
    `count` normal margins is divided by a standard deviation estimated with `dof` degrees of
    freedom (independent of it): sqrt(count) t_hat is noncentral t with noncentrality
    sqrt(count) t, so Var = dof (1/count + t^2) / (dof - 2) - t^2 c^2 with
    c = sqrt(dof/2) Gamma((dof-1)/2) / Gamma(dof/2). It tends to 1/count + t^2 / (2 dof) for
    many degrees of freedom (the delta method's) and is larger for few; infinite at dof <= 2."""
    from scipy.special import gammaln

    dof = np.asarray(dof, np.float64)
    finite = np.isfinite(dof) & (dof > 2)
    safe = np.where(finite, dof, 3.0)
    c_sq = safe / 2 * np.exp(2 * (gammaln((safe - 1) / 2) - gammaln(safe / 2)))
    variance = safe * (1.0 / count + t * t) / (safe - 2) - t * t * c_sq
    return np.where(finite, variance, np.where(np.isinf(dof), 1.0 / count, np.inf))


# The prior's variance follows the margins' mean (in examples sorted by it, bins of at least
# TREND_BIN_EXAMPLES, at most TREND_BINS bins): the margins of an example that every model gets
# right spread less than those of one the models disagree on.
TREND_BINS = 16
TREND_BIN_EXAMPLES = 64


def moderated_prior(variance: np.ndarray, dof: np.ndarray, mean: np.ndarray
                    ) -> tuple[float, np.ndarray]:
    """(prior degrees of freedom d0, prior variance s0^2 [N]) of a scaled inverse chi-square
    prior on per-example variances, fitted to sample variances [N] with dof [N] by the method
    of moments on their logarithms (Smyth 2004, "Linear models and empirical Bayes methods for
    assessing differential expression"), with s0^2 a function of the examples' mean margin
    (binned, interpolated: the trend of limma-trend). d0 = inf when the variances are no more
    spread around the trend than sampling alone spreads them. Examples with dof < 1 or a
    variance of 0 do not inform the prior."""
    from scipy.special import digamma, polygamma

    usable = (dof >= 1) & (variance > 0) & np.isfinite(variance)
    if usable.sum() < 3:
        positive = variance[usable]
        return np.inf, np.full(variance.shape, positive.mean() if len(positive) else 1.0)
    centred = (np.log(variance[usable]) - digamma(dof[usable] / 2)
               + np.log(dof[usable] / 2))  # E = log s0^2 + digamma(d0/2) - log(d0/2)
    bins = max(1, min(TREND_BINS, usable.sum() // TREND_BIN_EXAMPLES))
    order = np.argsort(mean[usable], kind="stable")
    groups = np.array_split(order, bins)
    centres = np.array([np.median(mean[usable][g]) for g in groups])
    levels = np.array([centred[g].mean() for g in groups])
    trend_usable = np.interp(mean[usable], centres, levels)
    trend = np.interp(np.nan_to_num(mean), centres, levels)
    excess = (centred - trend_usable).var(ddof=bins) - polygamma(1, dof[usable] / 2).mean()
    if excess <= 0:
        return np.inf, np.exp(trend)
    prior_dof = 2 * _inverse_trigamma(excess)
    return float(prior_dof), np.exp(trend + digamma(prior_dof / 2) - np.log(prior_dof / 2))


def _inverse_trigamma(y: float) -> float:
    """x with trigamma(x) = y > 0 (Newton's method on 1/trigamma, as Smyth's limma does)."""
    from scipy.special import polygamma

    x = 0.5 + 1.0 / y
    for _ in range(50):
        trigamma = polygamma(1, x)
        step = trigamma * (1 - trigamma / y) / polygamma(2, x)
        x += step
        if -step / x < 1e-8:
            break
    return float(x)


def normal_fits(count, total, total_sq) -> NormalFits:
    """Normal fits of one side from its sufficient statistics ([..., N] models, sum and sum of
    squares in logits), each example's variance moderated towards a prior fitted across the
    examples of the same row (`moderated_prior`): with few models a variance is mostly the
    prior's, with many mostly the example's own."""
    count = np.asarray(count, np.float64) * np.ones_like(np.asarray(total, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / count
        sample_var = np.maximum(total_sq - count * mean * mean, 0.0) / (count - 1)
    sample_dof = np.maximum(count - 1, 0.0)
    sample_var = np.where(sample_dof > 0, sample_var, 0.0)
    variance, dof = np.empty_like(mean), np.empty_like(mean)
    for row in np.ndindex(mean.shape[:-1]):
        prior_dof, prior_var = moderated_prior(sample_var[row], sample_dof[row], mean[row])
        if np.isinf(prior_dof):
            variance[row], dof[row] = prior_var, np.inf
        else:
            dof[row] = prior_dof + sample_dof[row]
            variance[row] = (prior_dof * prior_var + sample_dof[row] * sample_var[row]) / dof[row]
    return NormalFits(count, mean, variance, dof)


def memorization_margin(in_count, out_count, sums) -> dict[str, np.ndarray]:
    """The model-based estimate of the Feldman & Zhang score from margin sums: per example
    P[margin > 0] under the normal fit of its in-subset models' margins minus the same of its
    held-out models' (`normal_fits`, variances moderated towards a prior fitted across the
    examples of each evaluated epoch), with a standard error.

    in_count, out_count [N] included models; sums: MarginSums or its [E, 4, N] array.
    Returns memorization_margin and memorization_margin_se [E, N] (NaN where a side has no
    model)."""
    named = (sums if isinstance(sums, MarginSums) else MarginSums(np.asarray(sums))).named()
    sides = [normal_fits(np.asarray(count)[None], named[f"{side}_sum"],
                         named[f"{side}_sumsq"]).correct_probability()
             for side, count in (("in", in_count), ("out", out_count))]
    (p_in, se_in), (p_out, se_out) = sides
    return {"memorization_margin": p_in - p_out,
            "memorization_margin_se": np.sqrt(se_in**2 + se_out**2)}
