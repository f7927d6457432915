"""Text outputs: Table 1 (parameters, train and test accuracy per run) as Markdown, and the
summary of the paper's analyses over a set of runs (JSON-ready dict and Markdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxmem.analysis import stats, transient
from jaxmem.rundir import Run

TABLE1_COLUMNS = ("run", "params", "models", "train_acc", "test_acc", "gap", "memorized",
                  "noise", "memorized_fdr")
TABLE1_HEADERS = {"run": "Run", "params": "Parameters", "models": "Models",
                  "train_acc": "Train acc.", "test_acc": "Test acc.", "gap": "Gap",
                  "memorized": "Memorized", "noise": "Noise mean (95th pct)",
                  "memorized_fdr": "Memorized at FDR"}


def format_params(count: int) -> str:
    """1234 -> '1.2K', 490000 -> '0.49M', 20040000 -> '20.04M'."""
    if count >= 100_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.1f}K"
    return str(count)


def sorted_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs ordered by dataset, then parameter count, then arch name."""
    return sorted(runs, key=lambda r: (stats.dataset_name(r), int(r.config.get("num_params", 0)),
                                       str(r.config.get("arch", ""))))


def table1_rows(runs: Sequence[Run], threshold: float | None = None) -> list[dict]:
    """One dict per run (ordered by dataset and size): label, arch, dataset, family, num_params,
    num_models, train_acc and test_acc (means over models, last evaluated epoch; train accuracy
    is on each model's own subset), gap, memorized (count above threshold), noise_mean and
    noise_p95 (the count with membership shuffled across models: what noise alone gives),
    memorized_fdr (the examples whose score exceeds the threshold at the run's false discovery
    rate)."""
    rows = []
    for run in sorted_runs(runs):
        train_acc = float(np.mean(run.train_acc[-1]))
        test_acc = float(np.mean(run.test_acc[-1]))
        null = stats.noise_floor(run, threshold)
        rows.append({
            "label": stats.run_label(run), "arch": run.config.get("arch", "?"),
            "dataset": stats.dataset_name(run), "family": stats.family(run.config.get("arch", "")),
            "num_params": stats.num_params(run), "num_models": int(run.masks.shape[0]),
            "train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc,
            "memorized": int(stats.stored_counts(run, threshold)[-1]),
            "noise_mean": float(null.mean[-1]), "noise_p95": float(null.p95[-1]),
            "memorized_fdr": int(len(run.memorized(stats.run_threshold(run, threshold),
                                                   fdr=stats.run_fdr(run)))),
            "threshold": stats.run_threshold(run, threshold),
        })
    return rows


def noise_cell(row: dict) -> str:
    """'41.2 (52)': the noise floor's mean and 95th percentile of a Table 1 row."""
    return f"{row['noise_mean']:.1f} ({row['noise_p95']:.0f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; cells are str()-ed, '|' escaped."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1(runs: Sequence[Run], threshold: float | None = None) -> str:
    """Table 1 as Markdown: parameters, models, train and test accuracy (%), gap, memorized."""
    rows = [[r["label"], format_params(r["num_params"]), r["num_models"],
             f"{100 * r['train_acc']:.1f}", f"{100 * r['test_acc']:.1f}", f"{100 * r['gap']:.1f}",
             r["memorized"], noise_cell(r), r["memorized_fdr"]]
            for r in table1_rows(runs, threshold)]
    return markdown_table([TABLE1_HEADERS[c] for c in TABLE1_COLUMNS], rows)


def modelwise_pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(smaller, larger) pairs for model-wise transient memorization: within each dataset,
    neighbours in parameter count inside a family; a dataset without two runs of one family
    pairs neighbours in size regardless of family."""
    pairs = []
    by_dataset: dict[str, list[Run]] = {}
    for run in sorted_runs(runs):
        by_dataset.setdefault(stats.dataset_name(run), []).append(run)
    for dataset_runs in by_dataset.values():
        found = []
        for fam in sorted({stats.family(r.config.get("arch", "")) for r in dataset_runs}):
            members = [r for r in dataset_runs if stats.family(r.config.get("arch", "")) == fam]
            found += list(zip(members, members[1:], strict=False))
        if not found:
            found = list(zip(dataset_runs, dataset_runs[1:], strict=False))
        pairs += found
    return pairs


def paper_summary(runs: Sequence[Run], threshold: float | None = None) -> dict:
    """The numbers behind the paper's claims, JSON-ready.

    runs: per run, Table 1's row, the stages of memorization over training (on the counts
    above the noise floor), the counts and their noise floor per evaluated epoch.
    gap_correlation: Pearson r and p of memorized count against the train-test gap.
    transient: model-wise (smaller -> larger, see modelwise_pairs) and epoch-wise (peak -> last)
    sets: count, how many of them score above the threshold at the false discovery rate where
    memorized, mean +- std of scores.
    """
    runs = sorted_runs(runs)
    per_run = []
    for row, run in zip(table1_rows(runs, threshold), runs, strict=True):
        stages = stats.run_stages(run, threshold)
        stored = stats.stored_counts(run, threshold)
        entry = {**row, "path": run.path, "stages": stages,
                 "counts_by_epoch": {"epochs": [int(e) for e in run.epochs],
                                     "count": [int(c) for c in stored]},
                 "noise_floor_by_epoch": stats.noise_floor(run, threshold).as_dict()}
        per_run.append(entry)
    correlation = stats.gap_correlation(runs, threshold)
    return {
        "threshold": per_run[0]["threshold"] if per_run and threshold is None else threshold,
        "runs": per_run,
        "gap_correlation": {"pearson_r": _clean(correlation["pearson_r"]),
                            "p_value": _clean(correlation["p_value"]), "num_runs": len(runs),
                            "gap": correlation["gap"],
                            "memorized_count": correlation["memorized_count"]},
        "transient": {
            "modelwise": [transient.modelwise(a, b, threshold).as_dict()
                          for a, b in modelwise_pairs(runs)],
            "epochwise": [{"run": stats.run_label(run),
                           **transient.epochwise(run, threshold).as_dict()} for run in runs],
        },
    }


def summary_markdown(summary: dict) -> str:
    """The paper_summary as Markdown: correlation, stages, transient sets."""
    corr = summary["gap_correlation"]
    lines = ["# Memorization summary", "",
             f"Memorized count vs train-test gap over {corr['num_runs']} runs: "
             f"Pearson r = {_fmt(corr['pearson_r'])}, p = {_fmt(corr['p_value'], '.3g')}.", "",
             "## Stages of memorization during training", "",
             "Counts are memorized examples above the noise floor (the 95th percentile of the "
             "count with membership shuffled across models): a rise and fall within the noise "
             "is no stage.", ""]
    stage_rows = [[r["label"], _fmt(r["stages"]["onset_epoch"], "d"),
                   _fmt(r["stages"]["peak_epoch"], "d"),
                   _fmt(r["stages"]["peak_count"], ".0f"), r["stages"]["final_epoch"],
                   _fmt(r["stages"]["final_count"], ".0f"),
                   _fmt(100 * r["stages"]["decline_fraction"], ".1f"),
                   "yes" if r["stages"]["rise_then_fall"] else "no"]
                  for r in summary["runs"]]
    lines.append(markdown_table(["Run", "Onset epoch", "Peak epoch", "Peak above noise",
                                 "Final epoch", "Final above noise", "Decline %",
                                 "Rise then fall above noise"], stage_rows))
    lines += ["## Counts and their noise floor", ""]
    lines.append(markdown_table(
        ["Run", "Epochs", "Memorized", "Noise mean", "Noise 95th pct"],
        [[r["label"], " ".join(str(e) for e in r["counts_by_epoch"]["epochs"]),
          " ".join(str(c) for c in r["noise_floor_by_epoch"]["observed"]),
          " ".join(f"{m:.1f}" for m in r["noise_floor_by_epoch"]["mean"]),
          " ".join(f"{p:.0f}" for p in r["noise_floor_by_epoch"]["p95"])]
         for r in summary["runs"]]))
    lines += ["## Transient memorization", "", "Model-wise (memorized by the first, not by the "
              "second; mean +- std of scores under each):", ""]
    lines.append(_transient_table(summary["transient"]["modelwise"]))
    lines += ["Epoch-wise (memorized at the peak epoch, not at the last):", ""]
    lines.append(_transient_table(summary["transient"]["epochwise"], with_run=True))
    return "\n".join(lines)


def _transient_table(records: list[dict], with_run: bool = False) -> str:
    headers = (["Run"] if with_run else []) + ["From", "To", "Count", "At FDR at From",
                                                "Score from", "Score to"]
    rows = [([r["run"]] if with_run else []) + [
        r["source"], r["target"], r["count"], _fmt(r["tested"], "d"),
        f"{_fmt(r['source_mean'])} +- {_fmt(r['source_std'])}",
        f"{_fmt(r['target_mean'])} +- {_fmt(r['target_std'])}"] for r in records]
    return markdown_table(headers, rows) if rows else "(none)\n"


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
