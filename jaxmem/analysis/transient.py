"""Transient memorization (the paper's section 4.3): examples memorized in one setting and not
in another.

Model-wise: memorized by run A (e.g. a smaller model) and not by run B (a larger one), on the
same training set. Epoch-wise: memorized at the peak epoch of a run and not at its last epoch.
Each set comes with its size and the mean +- std of its scores under both settings.
Examples whose score is NaN (too few in- or held-out models) in either setting, and canaries
(planted label changes), are left out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmem.analysis import stats
from jaxmem.errors import UserError
from jaxmem.estimator import DEFAULT_THRESHOLD
from jaxmem.rundir import Run


@dataclasses.dataclass(frozen=True)
class TransientSet:
    """indices [n]: memorized under `source` (score > threshold) and not under `target`
    (score <= threshold). source_mean/std and target_mean/std: scores of those examples
    (population std, ddof=0; NaN for an empty set). compared: examples finite in both.
    tested: how many of the set score above the threshold at the source's false discovery
    rate (`Run.memorized(..., fdr=...)`; None when not known)."""

    source: str
    target: str
    threshold: float
    indices: np.ndarray
    source_mean: float
    source_std: float
    target_mean: float
    target_std: float
    compared: int
    tested: int | None = None

    @property
    def count(self) -> int:
        return int(len(self.indices))

    def as_dict(self) -> dict:
        """JSON-ready summary (without the indices)."""
        def clean(v):
            return None if np.isnan(v) else float(v)
        return {"source": self.source, "target": self.target, "threshold": self.threshold,
                "count": self.count, "compared": self.compared, "tested": self.tested,
                "source_mean": clean(self.source_mean), "source_std": clean(self.source_std),
                "target_mean": clean(self.target_mean), "target_std": clean(self.target_std)}

    def describe(self) -> str:
        """One line: 'n examples memorized by A, not by B: a +- s -> b +- t'."""
        tested = "" if self.tested is None else (
            f", {self.tested} of them beyond noise at {self.source}")
        return (f"{self.count} examples memorized by {self.source}, not by {self.target} "
                f"(of {self.compared}{tested}): score {self.source_mean:.3f} +- "
                f"{self.source_std:.3f} -> {self.target_mean:.3f} +- {self.target_std:.3f}")


def transient_set(source_scores: np.ndarray, target_scores: np.ndarray,
                  threshold: float = DEFAULT_THRESHOLD, source: str = "source",
                  target: str = "target", source_tested: np.ndarray | None = None
                  ) -> TransientSet:
    """Examples with source score > threshold and target score <= threshold; both [N].
    source_tested: indices memorized beyond noise under the source (its FDR set)."""
    source_scores = np.asarray(source_scores, np.float64)
    target_scores = np.asarray(target_scores, np.float64)
    if source_scores.shape != target_scores.shape or source_scores.ndim != 1:
        raise UserError(f"scores must be two [N] arrays of one length, got "
                        f"{source_scores.shape} and {target_scores.shape}")
    finite = np.isfinite(source_scores) & np.isfinite(target_scores)
    chosen = finite & (np.where(finite, source_scores, -np.inf) > threshold) & (
        np.where(finite, target_scores, np.inf) <= threshold)
    indices = np.flatnonzero(chosen)
    moments = [_mean_std(values[indices]) for values in (source_scores, target_scores)]
    tested = None if source_tested is None else int(np.isin(indices, source_tested).sum())
    return TransientSet(source, target, float(threshold), indices, *moments[0], *moments[1],
                        int(finite.sum()), tested)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if not len(values):
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def modelwise(run_a: Run, run_b: Run, threshold: float | None = None,
              epoch_a: int | None = None, epoch_b: int | None = None) -> TransientSet:
    """Memorized by run A and not by run B (last evaluated epochs unless given). The runs must
    score the same training set (same labels, in the same order)."""
    if not np.array_equal(run_a.labels, run_b.labels):
        raise UserError(f"{run_a.path} and {run_b.path} do not score the same training set")
    threshold = stats.run_threshold(run_a, threshold)
    return transient_set(run_a.counted_scores(epoch_a), run_b.counted_scores(epoch_b),
                         threshold, stats.run_label(run_a), stats.run_label(run_b),
                         run_a.memorized(threshold, epoch_a, stats.run_fdr(run_a)))


def epochwise(run: Run, threshold: float | None = None,
              peak_epoch: int | None = None) -> TransientSet:
    """Memorized at the peak epoch (located by `stats.run_stages` unless given) and not at the
    last evaluated epoch of the same run. Empty when the peak is the last epoch."""
    threshold = stats.run_threshold(run, threshold)
    if peak_epoch is None:
        peak_epoch = stats.run_stages(run, threshold)["peak_epoch"]
    last = int(run.epochs[-1])
    if peak_epoch is None:  # nothing memorized at any epoch
        peak_epoch = last
    return transient_set(run.counted_scores(int(peak_epoch)), run.counted_scores(last), threshold,
                         f"epoch {int(peak_epoch)}", f"epoch {last}",
                         run.memorized(threshold, int(peak_epoch), stats.run_fdr(run)))
