"""Per-example tests that a score exceeds a threshold, and the Benjamini-Hochberg procedure that
turns them into a set with a controlled false discovery rate.

A score is a difference of two proportions, p_in - p_out (in-subset and held-out accuracy of
one example, or of one test example with and without one training example: influence). The
hypothesis tested is H0: p_in - p_out <= margin against p_in - p_out > margin, by the score test
of Farrington & Manning (1990) with Miettinen & Nurminen's (1985) variance factor N / (N - 1):

    z = (p̂_in - p̂_out - margin) / sqrt((p̃_in (1 - p̃_in) / n_in + p̃_out (1 - p̃_out) / n_out)
                                         * N / (N - 1)),   N = n_in + n_out,

with (p̃_in, p̃_out) the maximum likelihood estimate restricted to p̃_in - p̃_out = margin (a root
of a cubic, solved in closed form), and the one-sided p-value 1 - Phi(z). With the threshold as
the margin, Benjamini-Hochberg at level q selects examples whose score exceeds the threshold,
at most a share q of them expected to have a true score at or below it. (Testing score > 0 and
then keeping the estimates above the threshold, as one might, lets an example of true score
0.24 at K = 2,000 in about a third of the time.) Measured at the boundary: see
tests/test_significance.py and BENCHMARKS.md.

Vectorised over any number of examples (closed form, no loop per example). Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np

from jaxmem import estimator
from jaxmem.errors import UserError

DEFAULT_Q = 0.05


def check_q(q) -> float:
    if not 0.0 < q < 1.0:
        raise UserError(f"q must be in (0, 1), got {q}")
    return float(q)


def margin_pvalues(in_correct, out_correct, in_count, out_count, margin: float,
                   min_count: int = estimator.DEFAULT_MIN_COUNT) -> np.ndarray:
    """One-sided p-values of H0: p_in - p_out <= margin (the score test above).

    in_correct, out_correct [..., N] and in_count, out_count [N] (broadcastable) integer counts,
    as `estimator.from_counts` takes them (merged runs add them up); margin in (-1, 1). Returns
    float64 [..., N], NaN where the score is NaN (fewer than min_count in- or held-out models).
    """
    if not -1.0 < margin < 1.0:
        raise UserError(f"the margin (threshold) must be in (-1, 1), got {margin}")
    in_correct, out_correct, in_count, out_count = _counts(in_correct, out_correct, in_count,
                                                           out_count)
    low_count = estimator.too_few_models(in_count, out_count, min_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_in = np.where(low_count, 1.0, in_count)  # placeholders: NaN'ed at the end
        n_out = np.where(low_count, 1.0, out_count)
        x_in, x_out = np.minimum(in_correct, n_in), np.minimum(out_correct, n_out)
        p_out = restricted_mle(x_in, n_in, x_out, n_out, margin)
        p_in = p_out + margin
        total = n_in + n_out
        variance = (p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out) * total / (total - 1)
        difference = x_in / n_in - x_out / n_out - margin
        pvalues = np.where(variance > 0, _normal_sf(difference / np.sqrt(variance)),
                           (difference <= 0).astype(np.float64))
    return np.where(low_count, np.nan, pvalues)


def restricted_mle(x_in, n_in, x_out, n_out, margin: float) -> np.ndarray:
    """The held-out proportion p̃_out maximising the binomial likelihood of (x_in of n_in,
    x_out of n_out) under p_in = p_out + margin, element-wise (float arrays, n >= 1).

    Setting the derivative of the restricted log-likelihood to zero and multiplying by
    p (1 - p) (p + m) (1 - p - m) gives the cubic a p^3 + b p^2 + c p + d = 0 with
    a = N, b = m (n_in + 2 n_out) - N - x_in - x_out, c = m^2 n_out - m (N + 2 x_out) + x_in +
    x_out, d = m (1 - m) x_out (m the margin, N = n_in + n_out). Its three real roots come from
    the trigonometric formula; each, and the two ends of the feasible interval
    [max(0, -m), min(1, 1 - m)], is a candidate, and the one of highest likelihood is returned
    (so p = 0 or 1 and tiny counts are handled by the same rule).
    """
    x_in, n_in, x_out, n_out = (np.asarray(v, np.float64) for v in (x_in, n_in, x_out, n_out))
    total = n_in + n_out
    b = (margin * (n_in + 2 * n_out) - total - x_in - x_out) / total
    c = (margin**2 * n_out - margin * (total + 2 * x_out) + x_in + x_out) / total
    d = margin * (1 - margin) * x_out / total
    shift = b / 3  # p = t - shift: t^3 + P t + Q = 0
    big_p = c - b * b / 3
    big_q = 2 * b**3 / 27 - b * c / 3 + d
    low, high = max(0.0, -margin), min(1.0, 1.0 - margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = 2 * np.sqrt(np.maximum(-big_p / 3, 0.0))
        cosine = np.clip(np.nan_to_num(3 * big_q / (big_p * radius), nan=1.0), -1, 1)
        angle = np.arccos(cosine) / 3
    candidates = [radius * np.cos(angle - 2 * np.pi * k / 3) - shift for k in range(3)]
    candidates = [np.clip(np.nan_to_num(v, nan=low), low, high) for v in candidates]
    candidates += [np.full(np.shape(total), low), np.full(np.shape(total), high)]
    likelihood = [_log_likelihood(x_in, n_in, x_out, n_out, p, margin) for p in candidates]
    best = np.argmax(np.stack(likelihood), axis=0)
    return np.take_along_axis(np.stack(candidates), best[None], axis=0)[0]


def _log_likelihood(x_in, n_in, x_out, n_out, p_out, margin):
    from scipy.special import xlog1py, xlogy

    p_in = p_out + margin
    return (xlogy(x_in, p_in) + xlog1py(n_in - x_in, -p_in) + xlogy(x_out, p_out)
            + xlog1py(n_out - x_out, -p_out))


def _normal_sf(z):
    from scipy.special import ndtr

    return ndtr(-z)


def _counts(in_correct, out_correct, in_count, out_count):
    try:
        counts = np.broadcast_arrays(*(np.asarray(c) for c in
                                       (in_correct, out_correct, in_count, out_count)))
    except ValueError as error:
        raise UserError(f"counts do not broadcast together: {error}") from None
    for name, values in zip(("in_correct", "out_correct", "in_count", "out_count"), counts,
                            strict=True):
        if values.size and ((values < 0).any() or (values != np.round(values)).any()):
            raise UserError(f"{name} must hold non-negative integer counts")
    in_correct, out_correct, in_count, out_count = (c.astype(np.float64) for c in counts)
    if ((in_correct > in_count) | (out_correct > out_count)).any():
        raise UserError("correct counts exceed their model counts")
    return in_correct, out_correct, in_count, out_count


def benjamini_hochberg(pvalues, q: float = DEFAULT_Q, num_tests: int | None = None
                       ) -> np.ndarray:
    """The Benjamini-Hochberg step-up procedure at level q, row-wise over the last axis.

    pvalues [..., N] (e.g. [N] or [E, N]); NaN is no hypothesis: never selected and not counted
    in m, the number of hypotheses, which is the finite p-values of the row unless num_tests
    gives a larger family (its other members count as p-values of 1, never selected). With
    p_(1) <= ... <= p_(m) sorted, k is the largest rank with p_(k) <= k q / m; the k smallest
    p-values are selected (none when there is no such k). Returns bool [..., N].
    """
    q = check_q(q)
    pvalues = np.asarray(pvalues, np.float64)
    finite = ~np.isnan(pvalues)
    if ((pvalues[finite] < 0) | (pvalues[finite] > 1)).any():
        raise UserError("p-values must be in [0, 1] (or NaN)")
    if pvalues.ndim == 0 or pvalues.shape[-1] == 0:
        return np.zeros(pvalues.shape, bool)
    tested = finite.sum(axis=-1, keepdims=True)  # m per row
    if num_tests is not None:
        if (tested > num_tests).any():
            raise UserError(f"num_tests {num_tests} is below the {int(tested.max())} p-values "
                            "given")
        tested = np.full_like(tested, num_tests)
    ordered = np.sort(pvalues, axis=-1)  # NaN last
    ranks = np.arange(1, pvalues.shape[-1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        passing = ordered <= ranks * q / tested  # NaN rows of `ordered` never pass
    last = pvalues.shape[-1] - 1 - np.argmax(passing[..., ::-1], axis=-1)  # largest passing k
    cutoff = np.where(passing.any(axis=-1), np.take_along_axis(
        ordered, last[..., None], axis=-1)[..., 0], -np.inf)
    with np.errstate(invalid="ignore"):
        return finite & (pvalues <= cutoff[..., None])


def memorized_at_fdr(pvalues, real, q: float = DEFAULT_Q) -> np.ndarray:
    """The memorized set at false discovery rate q, the one rule every reader uses: the
    Benjamini-Hochberg procedure at level q over the real examples' p-values of H0: score <=
    threshold (`margin_pvalues` with the threshold as margin). Canaries (real False) and NaN
    p-values are no hypotheses. pvalues [..., N], real [N] bool -> bool [..., N]."""
    return benjamini_hochberg(np.where(real, pvalues, np.nan), q)
