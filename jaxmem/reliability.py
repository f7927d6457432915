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


def spearman_brown(rho: float, factor: float) -> float:
    """The reliability of a score over `factor` times as many models as one of reliability
    rho."""
    return factor * rho / (1 + (factor - 1) * rho)


def models_for(target: float, rho: float, models: int) -> float:
    """Models needed for reliability `target` when `models` models give rho (inf where rho
    <= 0, i.e. no agreement to build on)."""
    if not rho > 0:
        return float("inf")
    if rho >= 1:
        return float(models)
    return models * target * (1 - rho) / (rho * (1 - target))


def halves(num_models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the model rows 0..K-1 (K // 2 and K - K // 2), drawn from the seed."""
    order = np.random.default_rng([seed, 0x5E1F]).permutation(num_models)
    return np.sort(order[:num_models // 2]), np.sort(order[num_models // 2:])


def _ranks_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def split_half(masks: np.ndarray, correct: np.ndarray, units: np.ndarray | None,
               seed: int, examples: np.ndarray | None = None) -> dict:
    """The run's split-half reliability. masks, correct [K, N] bool and units [K, N] int16
    margins (None: no margins) of the included models at the last evaluated epoch;
    examples [N] bool: the examples to correlate over (default all; canaries are left out by
    the caller). Returns a JSON-ready record: per estimator ("plain", and "margin" when there
    are margins) the halves' Spearman correlation, the reliability at K (Spearman-Brown), the
    models it needs for TARGET_RELIABILITY, and for the margin estimate the models the plain
    estimator would need for the margin estimate's reliability."""
    masks, correct = np.asarray(masks, bool), np.asarray(correct, bool)
    num_models = len(masks)
    examples = np.ones(masks.shape[1], bool) if examples is None else np.asarray(examples, bool)
    record = {"num_models": num_models, "seed": int(seed), "target": TARGET_RELIABILITY,
              "half_min_count": HALF_MIN_COUNT}
    if num_models < 4:
        return {**record, "examples": 0, "plain": None, "margin": None}
    first, second = halves(num_models, seed)
    scored, per_half = examples.copy(), {"plain": [], "margin": []}
    for rows in (first, second):
        plain = estimator.memorization_scores(masks[rows], correct[rows], HALF_MIN_COUNT)
        scored &= ~plain["low_count"]
        per_half["plain"].append(plain["memorization"])
        if units is not None:
            in_count, out_count = estimator.membership_counts(masks[rows])
            sums = MarginSums.of(np.asarray(units)[rows][None], masks[rows],
                                 np.ones(len(rows), bool))
            per_half["margin"].append(
                memorization_margin(in_count, out_count, sums)["memorization_margin"][0])
    record["examples"] = int(scored.sum())
    half = num_models / 2
    for name, (a, b) in ((n, v) for n, v in per_half.items() if v):
        rho = _ranks_correlation(a[scored], b[scored])
        reliability = spearman_brown(rho, 2.0) if np.isfinite(rho) else float("nan")
        record[name] = {"half_spearman": rho, "reliability": reliability,
                        "models_for_target": models_for(TARGET_RELIABILITY, rho, half)}
    record.setdefault("margin", None)
    if record["margin"] and record["plain"]:
        record["margin"]["plain_models_for_same"] = models_for(
            record["margin"]["reliability"], record["plain"]["half_spearman"], half)
    return _plain_numbers(record)


def _plain_numbers(record):
    """JSON-ready: NaN and infinity (no agreement to build on) become None."""
    if isinstance(record, dict):
        return {k: _plain_numbers(v) for k, v in record.items()}
    if isinstance(record, float) and not np.isfinite(record):
        return None
    return record
