"""The paper's statistics over run directories: memorized sets and counts per evaluated epoch
next to their noise floor, the three stages of memorization during training (Figure 2), model
families and sizes (Figure 1), and the correlation of memorization with the train-test gap
(Figure 3).

The counts carry no interval: a percentile bootstrap over models does not cover (resampling
duplicates models and pushes more examples over the threshold), and no interval whose coverage
was measured (experiments/benchmarks/count_intervals.py, numbers in BENCHMARKS.md) reached its
nominal rate. What noise alone gives is the permutation null (`noise_floor`).

Every count is recomputed from the estimator's inputs (masks and correctness) through
`jaxmem.estimator`, so a statistic here never disagrees with the stored scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmem import estimator, significance
from jaxmem.errors import UserError
from jaxmem.rundir import Run

FAMILIES = ("vgg", "resnet", "vit")  # anything else is "other"
DEFAULT_ONSET_FRACTION = 0.1


def run_threshold(run: Run, threshold: float | None = None) -> float:
    """`threshold` if given, else the run's configured threshold (0.25 by default)."""
    if threshold is not None:
        return float(threshold)
    return float(run.config.get("threshold", estimator.DEFAULT_THRESHOLD))


def run_fdr(run: Run) -> float:
    """The run's false discovery rate for its memorized set (0.05 by default)."""
    return float(run.config.get("fdr", significance.DEFAULT_Q))


def run_min_count(run: Run) -> int:
    return int(run.config.get("min_count", estimator.DEFAULT_MIN_COUNT))


def memorized_set(memorization: np.ndarray, threshold: float = estimator.DEFAULT_THRESHOLD
                  ) -> np.ndarray:
    """Indices (sorted) of the examples whose score is above threshold; NaN never counts.
    memorization [N] -> [n] int64."""
    memorization = np.asarray(memorization, np.float64)
    return np.flatnonzero(np.nan_to_num(memorization, nan=-np.inf) > threshold)


def memorized_sets(run: Run, threshold: float | None = None) -> dict[int, np.ndarray]:
    """{evaluated epoch (1-based): indices of memorized examples} for every evaluated epoch."""
    threshold = run_threshold(run, threshold)
    return {int(epoch): memorized_set(scores, threshold)
            for epoch, scores in zip(run.epochs, np.where(run.real, run.memorization_by_epoch,
                                                          np.nan),
                                     strict=True)}


def stored_counts(run: Run, threshold: float | None = None) -> np.ndarray:
    """[E] memorized counts from the stored scores (no resampling)."""
    return np.asarray(estimator.memorized_count(run.memorization_by_epoch[:, run.real],
                                                 run_threshold(run, threshold)), np.int64)


def memorization_stages(epochs: Sequence[int], counts: Sequence[float],
                        onset_fraction: float = DEFAULT_ONSET_FRACTION,
                        floor: Sequence[float] | None = None) -> dict:
    """Locate the paper's three stages of memorization during training (Figure 2), on the
    counts above the noise floor.

    floor [E]: what noise alone gives at each epoch (the permutation null's 95th percentile);
    the stages are located on the excess max(count - floor, 0), so a rise and fall that stays
    within the noise is no stage at all (None: no floor, the raw counts).
    Stage 1 (no memorization): epochs before the onset, the first evaluated epoch whose excess
    reaches onset_fraction of the peak excess (and is above 0). Stage 2 (rise): onset up to the
    peak, the first epoch with the highest excess. Stage 3 (decline): after the peak. A run
    whose counts never exceed the floor has no onset and no peak.

    Returns onset_epoch, peak_epoch, peak_count and final_count (the excess), final_epoch,
    decline (peak - final excess), decline_fraction (decline / peak), stage [E] (one of "none",
    "rise", "decline"), rise_then_fall (the excess peaks before the last epoch and then falls:
    with a floor, a rise and fall that noise alone cannot produce).
    """
    epochs = [int(e) for e in epochs]
    counts = np.asarray(counts, np.float64)
    if len(epochs) != len(counts) or not len(epochs):
        raise UserError(f"need one count per epoch, got {len(epochs)} epochs, {len(counts)} counts")
    if floor is not None:
        counts = np.maximum(counts - np.asarray(floor, np.float64), 0.0)
    peak_at = int(np.argmax(counts))
    peak = float(counts[peak_at])
    final = float(counts[-1])
    result = {"final_epoch": epochs[-1], "final_count": final, "peak_count": peak}
    if peak <= 0:
        return {**result, "onset_epoch": None, "peak_epoch": None, "decline": 0.0,
                "decline_fraction": 0.0, "stage": ["none"] * len(epochs),
                "rise_then_fall": False}
    onset_at = int(np.flatnonzero((counts >= onset_fraction * peak) & (counts > 0))[0])
    stage = ["none" if e < onset_at else "rise" if e <= peak_at else "decline"
             for e in range(len(epochs))]
    return {**result, "onset_epoch": epochs[onset_at], "peak_epoch": epochs[peak_at],
            "decline": peak - final, "decline_fraction": (peak - final) / peak, "stage": stage,
            "rise_then_fall": bool(peak_at < len(epochs) - 1 and final < peak)}


def run_stages(run: Run, threshold: float | None = None,
               onset_fraction: float = DEFAULT_ONSET_FRACTION) -> dict:
    """memorization_stages of a run's counts per evaluated epoch above its noise floor."""
    return memorization_stages(run.epochs, stored_counts(run, threshold), onset_fraction,
                               noise_floor(run, threshold).p95)


def noise_floor(run: Run, threshold: float | None = None,
                num_permutations: int | None = None) -> significance.NullCounts:
    """The permutation null of a run's memorized count at every evaluated epoch (real
    examples, included models): stored by the run for its own threshold and number of
    permutations, recomputed for others."""
    threshold = run_threshold(run, threshold)
    stored = run.extra.get("null_samples_by_epoch")  # [R, E]
    wanted = num_permutations or (len(stored) if stored is not None else
                                  significance.DEFAULT_PERMUTATIONS)
    if stored is not None and threshold == run_threshold(run) and wanted == len(stored):
        return significance.null_counts(stored, stored_counts(run, threshold),
                                        int(run.config.get("seed", 0)))
    return significance.permutation_null(
        np.asarray(run.masks)[:, run.real], run.correct_epochs("train", real_only=True),
        threshold, run_min_count(run), wanted, int(run.config.get("seed", 0)))


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (scipy.stats.pearsonr) over the finite pairs;
    (nan, nan) with fewer than 2 pairs or a constant input."""
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def train_test_gap(run: Run) -> float:
    """Mean over models of (accuracy on its own subset - test accuracy), last evaluated epoch."""
    return float(np.mean(run.train_acc[-1]) - np.mean(run.test_acc[-1]))


def gap_correlation(runs: Sequence[Run], threshold: float | None = None) -> dict:
    """Figure 3: memorized count against the train-test gap over runs, with Pearson r and p."""
    gaps = [train_test_gap(run) for run in runs]
    counts = [int(stored_counts(run, threshold)[-1]) for run in runs]
    r, p = pearson(gaps, counts)
    return {"gap": gaps, "memorized_count": counts, "pearson_r": r, "p_value": p}


def family(arch: str) -> str:
    """Model family of an architecture name: 'vgg', 'resnet', 'vit' or 'other'."""
    name = arch.lower()
    return next((fam for fam in FAMILIES if fam in name), "other")


def num_params(run: Run) -> int:
    """Trainable parameters of one model of the run (config.json's num_params)."""
    if "num_params" not in run.config:
        raise UserError(f"{run.path}: config.json has no num_params")
    return int(run.config["num_params"])


def size_series(runs: Sequence[Run], threshold: float | None = None) -> dict[tuple[str, str], dict]:
    """Figure 1: {(dataset, family): {"arch", "num_params", "memorized_count"}}, each list
    sorted by parameter count."""
    series: dict[tuple[str, str], list] = {}
    for run in runs:
        key = (dataset_name(run), family(run.config.get("arch", "")))
        series.setdefault(key, []).append(
            (num_params(run), run.config.get("arch", "?"), int(stored_counts(run, threshold)[-1])))
    return {key: {"num_params": [p for p, _, _ in sorted(points)],
                  "arch": [a for _, a, _ in sorted(points)],
                  "memorized_count": [c for _, _, c in sorted(points)]}
            for key, points in sorted(series.items())}


def dataset_name(run: Run) -> str:
    """The dataset's short name (a file path becomes its base name without extension)."""
    name = str(run.config.get("dataset_name") or run.config.get("dataset", "?"))
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".npz")


def run_label(run: Run) -> str:
    """Short name of a run: 'dataset/arch', with '-sSEED' for a seed other than 0 (the run
    directory's name when there is no arch)."""
    arch = run.config.get("arch")
    if not arch:
        return run.path.rstrip("/").rsplit("/", 1)[-1]
    seed = run.config.get("seed", 0)
    return f"{dataset_name(run)}/{arch}" + (f"-s{seed}" if seed else "")
