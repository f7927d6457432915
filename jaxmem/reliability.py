"""Each run's own reliability: how stable its scores are, and how many models would make them
stable, measured on the run itself.

The included models are split in two halves (seeded), each half scores every example with each
estimator, and the Spearman correlation of the halves' scores, corrected to the full K with
the Spearman-Brown formula (the reliability of a score averaged over twice as many models),
estimates the agreement of this run's scores with those of another run of K models. The same
formula says how many models a reliability needs: with half-reliability rho at K/2 models,
n * K/2 models reach R where n = R (1 - rho) / (rho (1 - R)).

Pure numpy/scipy: no jax.
"""

from __future__ import annotations

import numpy as np

from jaxmem import estimator
from jaxmem.margins import MarginSums, memorization_margin

# The reliability a run says how many models would reach.
TARGET_RELIABILITY = 0.9
# Both halves score an example once it has this many in- and held-out models in each half
# (the estimator's own minimum); the same examples are used for both estimators.
HALF_MIN_COUNT = 2
# Random splits averaged: one split's correlation varies with the split.
SPLITS = 8


def spearman_brown(rho: float, factor: float) -> float:
    """The reliability of a score over `factor` times as many models as one of reliability
    rho (NaN where rho <= 0: no agreement to build on)."""
    return factor * rho / (1 + (factor - 1) * rho) if rho > 0 else float("nan")


def models_for(target: float, rho: float, models: int) -> float:
    """Models needed for reliability `target` when `models` models give rho (inf where rho
    <= 0, i.e. no agreement to build on)."""
    if not rho > 0:
        return float("inf")
    if rho >= 1:
        return float(models)
    return models * target * (1 - rho) / (rho * (1 - target))


def halves(num_models: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `split` of the model rows 0..K-1 in two halves (K // 2 and K - K // 2), drawn
    from the seed."""
    order = np.random.default_rng([seed, 0x5E1F, split]).permutation(num_models)
    return np.sort(order[:num_models // 2]), np.sort(order[num_models // 2:])


def _ranks_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def _half_scores(masks, correct, units, rows) -> dict[str, np.ndarray]:
    """Both estimators' scores [N] from the models `rows` (NaN below HALF_MIN_COUNT)."""
    plain = estimator.memorization_scores(masks[rows], correct[rows], HALF_MIN_COUNT)
    scores = {"plain": plain["memorization"]}
    if units is not None:
        in_count, out_count = estimator.membership_counts(masks[rows])
        sums = MarginSums.of(units[rows][None], masks[rows], np.ones(len(rows), bool))
        margin = memorization_margin(in_count, out_count, sums)["memorization_margin"][0]
        scores["margin"] = np.where(plain["low_count"], np.nan, margin)
    return scores


def split_half(masks: np.ndarray, correct: np.ndarray, units: np.ndarray | None,
               seed: int, examples: np.ndarray | None = None) -> dict:
    """The run's split-half reliability. masks, correct [K, N] bool and units [K, N] int16
    margins (None: no margins) of the included models at the last evaluated epoch;
    examples [N] bool: the examples that count (default all; the caller leaves the canaries
    out).

    The correlation is over the CONTESTED examples, those that at least one model gets wrong:
    an example every model gets right scores exactly 0 in any run of the plain estimator, and
    a Spearman correlation over a block of such ties (89% of the digits) measures the ties,
    not the scores. It is the mean over SPLITS splits, each over the examples both halves
    score. Returns a JSON-ready record: per estimator ("plain", and "margin" when there are
    margins) the halves' mean Spearman correlation, the reliability at K (Spearman-Brown),
    the models it needs for TARGET_RELIABILITY, and for the margin estimate the models the
    plain estimator would need for the margin estimate's reliability."""
    masks, correct = np.asarray(masks, bool), np.asarray(correct, bool)
    num_models = len(masks)
    examples = np.ones(masks.shape[1], bool) if examples is None else np.asarray(examples, bool)
    contested = examples & ~correct.all(axis=0)
    record = {"num_models": num_models, "seed": int(seed), "target": TARGET_RELIABILITY,
              "half_min_count": HALF_MIN_COUNT, "splits": SPLITS,
              "contested_examples": int(contested.sum()), "plain": None, "margin": None}
    if num_models < 4 or not contested.any():
        return record
    units = None if units is None else np.asarray(units)
    correlations: dict[str, list[float]] = {}
    for split in range(SPLITS):
        first, second = (_half_scores(masks, correct, units, rows)
                         for rows in halves(num_models, seed, split))
        scored = contested & np.isfinite(first["plain"]) & np.isfinite(second["plain"])
        for name in first:
            correlations.setdefault(name, []).append(
                _ranks_correlation(first[name][scored], second[name][scored]))
    half = num_models / 2
    for name, values in correlations.items():
        rho = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        record[name] = {"half_spearman": rho, "reliability": spearman_brown(rho, 2.0),
                        "models_for_target": models_for(TARGET_RELIABILITY, rho, half)}
    if record["margin"] and record["plain"]:
        record["margin"]["plain_models_for_same"] = models_for(
            record["margin"]["reliability"], record["plain"]["half_spearman"], half)
    return _plain_numbers(record)


def _plain_numbers(record):
    """JSON-ready: NaN and infinity (no agreement to build on) become None."""
    if isinstance(record, dict):
        return {k: _plain_numbers(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_plain_numbers(v) for v in record]
    if isinstance(record, float) and not np.isfinite(record):
        return None
    return record


def describe(record: dict) -> str:
    """The split-half record in a sentence (the run's summary and report)."""
    plain, margin = record.get("plain"), record.get("margin")
    if not plain or plain.get("reliability") is None:
        return (f"not measured ({record['num_models']} models, "
                f"{record['contested_examples']} examples that some model gets wrong)")
    models = lambda count: "more than 100,000" if count is None else f"{count:,.0f}"  # noqa: E731
    line = (f"the scores agree with those of another run of {record['num_models']} models to "
            f"about {plain['reliability']:.2f} (Spearman, split halves, "
            f"{record['contested_examples']} examples that some model gets wrong)")
    if not margin or margin.get("reliability") is None:
        return f"{line}; about {models(plain['models_for_target'])} models would reach " \
               f"{record['target']}"
    return (f"{line}, the margin estimate (memorization_margin) to {margin['reliability']:.2f}: "
            f"these {record['num_models']} models score like about "
            f"{models(margin['plain_models_for_same'])} with correctness alone; "
            f"{record['target']} takes about {models(margin['models_for_target'])} models with "
            f"margins, {models(plain['models_for_target'])} without")


def convergence(masks: np.ndarray, correct: np.ndarray, units: np.ndarray | None, seed: int,
                examples: np.ndarray | None = None) -> dict:
    """Agreement as models are added, on the run's own models: the models are split in two
    halves (`halves`, split 0); the plain score of the second half is the reference, and the
    first k models of the first half (k = 4, 8, ... up to the half) are scored by each
    estimator and correlated with it (Spearman, over the examples some model gets wrong that
    both score). Returns {"models": [k...], "plain": [rho...], "margin": [rho...] (None
    without margins), "reference_models": K - K // 2}."""
    masks, correct = np.asarray(masks, bool), np.asarray(correct, bool)
    examples = np.ones(masks.shape[1], bool) if examples is None else np.asarray(examples, bool)
    contested = examples & ~correct.all(axis=0)
    units = None if units is None else np.asarray(units)
    first, second = halves(len(masks), seed, 0)
    reference = _half_scores(masks, correct, None, second)["plain"]
    sizes = [k for k in 2 ** np.arange(2, 20) if k <= len(first)]
    curves: dict[str, list] = {"plain": [], "margin": []}
    for size in sizes:
        scores = _half_scores(masks, correct, units, first[:size])
        rows = contested & np.isfinite(reference) & np.isfinite(scores["plain"])
        for name in curves:
            curves[name].append(_ranks_correlation(scores[name][rows], reference[rows])
                                if name in scores else float("nan"))
    return _plain_numbers({"models": [int(k) for k in sizes], **curves,
                           "margin_kept": units is not None, "reference_models": len(second)})
