"""The paper's figures from run directories (matplotlib, Agg rendering, no pyplot state).

Figure 1: memorized count vs parameter count, one line per model family (per dataset panel).
Figure 2: memorized count vs training epoch with its noise floor and the three stages.
Figure 3: memorized count vs train-test gap over runs, with Pearson r and p.
Figure 4: score distributions across runs or across epochs.
Also: how the scores of each estimator converge as models are added (estimator_convergence).

Every function returns a `matplotlib.figure.Figure` (shown inline by Jupyter) and, given
`path`, also writes it as PNG. Figures are built on `Figure()` directly, so they never touch
the global pyplot state or the notebook's backend.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from jaxmem import reliability
from jaxmem.analysis import stats
from jaxmem.estimator import DEFAULT_THRESHOLD
from jaxmem.rundir import Run

DPI = 110
FAMILY_MARKERS = {"vgg": "o", "resnet": "s", "vit": "^", "other": "D"}
FAMILY_COLORS = {"vgg": "C0", "resnet": "C1", "vit": "C2", "other": "C7"}
STAGE_COLORS = {"none": "#dddddd", "rise": "#fde0c5", "decline": "#cfe3f5"}


def save(fig: Figure, path: str | None) -> Figure:
    """Write fig as PNG to path (creating its folder) when path is given; returns fig."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return fig


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (for embedding)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, bbox_inches="tight", format="png")
    return buffer.getvalue()


def _as_list(runs: Run | Sequence[Run]) -> list[Run]:
    return [runs] if isinstance(runs, Run) else list(runs)


def memorization_curve(runs: Run | Sequence[Run], threshold: float | None = None,
                       onset_fraction: float = stats.DEFAULT_ONSET_FRACTION,
                       path: str | None = None) -> Figure:
    """Figure 2: memorized count per evaluated epoch, one line per run.

    The hatched band is the noise floor: up to the 95th percentile of the count with membership
    shuffled across models (its mean dotted); stages are located on the counts above it. The
    count itself carries no interval (see jaxmem.analysis.stats).
    Onset (dotted) and peak (dashed) epochs are marked; a single run also gets its stages
    shaded (grey: no memorization above noise, orange: rise, blue: decline).
    """
    runs = _as_list(runs)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for run in runs:
        label = stats.run_label(run)
        epochs = np.asarray(run.epochs)
        values = stats.stored_counts(run, threshold)
        (line,) = ax.plot(epochs, values, marker="o", markersize=3, label=label)
        null = stats.noise_floor(run, threshold)
        ax.fill_between(epochs, 0, null.p95, color=line.get_color(), alpha=0.08, linewidth=0,
                        hatch="///")
        ax.plot(epochs, null.mean, color=line.get_color(), linestyle=":", linewidth=1,
                label=f"{label}: noise (shuffled membership), mean and 95th pct")
        stages = stats.memorization_stages(epochs, values, onset_fraction, null.p95)
        for key, style in (("onset_epoch", ":"), ("peak_epoch", "--")):
            if stages[key] is not None:
                ax.axvline(stages[key], color=line.get_color(), linestyle=style, linewidth=1)
        if len(runs) == 1:
            _shade_stages(ax, epochs, stages["stage"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"memorized examples (score > {stats.run_threshold(runs[0], threshold):g})")
    ax.set_title("Memorization during training")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    return save(fig, path)


def _shade_stages(ax, epochs: np.ndarray, stage: list[str]) -> None:
    edges = np.concatenate([[epochs[0] - 0.5], (epochs[1:] + epochs[:-1]) / 2,
                            [epochs[-1] + 0.5]])
    for i, name in enumerate(stage):
        ax.axvspan(edges[i], edges[i + 1], color=STAGE_COLORS[name], alpha=0.5, linewidth=0,
                   zorder=0)


def memorization_vs_size(runs: Sequence[Run], threshold: float | None = None,
                         path: str | None = None) -> Figure:
    """Figure 1: memorized count against parameters (log scale); one panel per dataset, one
    line per model family, each point named by its architecture."""
    series = stats.size_series(runs, threshold)
    datasets = sorted({dataset for dataset, _ in series})
    fig = Figure(figsize=(5.0 * len(datasets), 4.0))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        for (name, fam), points in series.items():
            if name != dataset:
                continue
            ax.plot(points["num_params"], points["memorized_count"],
                    marker=FAMILY_MARKERS[fam], color=FAMILY_COLORS[fam], label=fam)
            for x, y, arch in zip(points["num_params"], points["memorized_count"],
                                  points["arch"], strict=True):
                ax.annotate(arch, (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters")
        ax.set_ylabel("memorized examples")
        ax.set_title(f"Memorization vs model size ({dataset})")
        ax.legend(fontsize="small")
    return save(fig, path)


def memorization_vs_gap(runs: Sequence[Run], threshold: float | None = None,
                        path: str | None = None) -> Figure:
    """Figure 3: memorized count against the train-test gap (percentage points), one point
    per run, with the least-squares line and Pearson r, p in the title."""
    runs = list(runs)
    result = stats.gap_correlation(runs, threshold)
    gaps = 100 * np.asarray(result["gap"])
    counts = np.asarray(result["memorized_count"], np.float64)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for run, x, y in zip(runs, gaps, counts, strict=True):
        fam = stats.family(run.config.get("arch", ""))
        ax.scatter([x], [y], marker=FAMILY_MARKERS[fam], color=FAMILY_COLORS[fam])
        ax.annotate(stats.run_label(run), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small")
    if len(runs) >= 2 and np.ptp(gaps) > 0:
        slope, intercept = np.polyfit(gaps, counts, 1)
        xs = np.linspace(gaps.min(), gaps.max(), 2)
        ax.plot(xs, slope * xs + intercept, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("train - test accuracy (percentage points)")
    ax.set_ylabel("memorized examples")
    ax.set_title(f"Memorization vs generalization gap: r = {result['pearson_r']:.3f}, "
                 f"p = {result['p_value']:.3g}")
    return save(fig, path)


def score_histograms(scores: Mapping[str, np.ndarray], bins: int = 40,
                     threshold: float | None = DEFAULT_THRESHOLD,
                     title: str = "Memorization scores", log: bool = True,
                     path: str | None = None) -> Figure:
    """Figure 4: overlaid histograms of score arrays over [-1, 1] (NaN dropped), one per label;
    a dotted line at the threshold."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    plotted = 0
    for label, values in scores.items():
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values)]
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=label)
        plotted += len(values)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle=":", linewidth=1)
    if log and plotted:
        ax.set_yscale("log")
    ax.set_xlabel("memorization score")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return save(fig, path)


def run_score_histograms(runs: Run | Sequence[Run], bins: int = 40,
                         threshold: float | None = None, path: str | None = None) -> Figure:
    """Figure 4, across runs: each run's scores of its real examples (no canaries) at its
    last evaluated epoch."""
    runs = _as_list(runs)
    return score_histograms({stats.run_label(r): r.counted_scores() for r in runs}, bins,
                            stats.run_threshold(runs[0], threshold), "Scores across runs",
                            path=path)


def epoch_score_histograms(run: Run, epochs: Sequence[int] | None = None, bins: int = 40,
                           threshold: float | None = None, path: str | None = None) -> Figure:
    """Figure 4, across epochs of one run, real examples only (default: up to 4 evenly spread
    evaluated epochs, the last included)."""
    evaluated = [int(e) for e in run.epochs]
    if epochs is None:
        picks = np.unique(np.linspace(0, len(evaluated) - 1, min(4, len(evaluated))).round())
        epochs = [evaluated[int(i)] for i in picks]
    return score_histograms({f"epoch {e}": run.counted_scores(int(e)) for e in epochs}, bins,
                            stats.run_threshold(run, threshold),
                            f"Scores across epochs ({stats.run_label(run)})", path=path)


def estimator_convergence(run: Run, path: str | None = None) -> Figure:
    """How many models each estimator needs: the Spearman correlation of the scores of the
    first k models of one half of the run with the plain score of the other half, as k grows,
    for the plain estimator and the margin estimate (jaxmem.reliability.convergence)."""
    curve = reliability.convergence(run.masks, run.correct_train,
                                    run.margin_units if run.has_margins else None,
                                    int(run.config.get("seed", 0)), run.real)
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot()
    labels = {"plain": "plain (correct or not)", "margin": "margin estimate"}
    plotted = False
    for name, marker in (("plain", "o"), ("margin", "s")):
        values = np.array([np.nan if v is None else v for v in curve[name]], float)
        if np.isfinite(values).any():
            ax.plot(curve["models"], values, marker=marker, label=labels[name])
            plotted = True
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["models"], [str(k) for k in curve["models"]])
    ax.set_xlabel("models scoring")
    ax.set_ylabel(f"Spearman with {curve['reference_models']} other models")
    ax.set_title(f"Scores as models are added ({stats.run_label(run)})", fontsize=9)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:  # e.g. every model right on every example, or too few models for a score
        ax.text(0.5, 0.5, "no correlation to show: too few scores that differ", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    return save(fig, path)
