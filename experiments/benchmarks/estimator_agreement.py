"""How many models each estimator needs: draws of K models from a large run against a reference
of other models of the same run.

    python experiments/benchmarks/estimator_agreement.py RUN [--reference 512] \\
        [--sizes 8,16,32,64,128] [--draws 5] [--planted DATA.npz] [--json OUT.json]

For each K, `--draws` disjoint draws of K of the run's models (seeded); each draw is scored by
the plain estimator (`memorization`, at the run's --min-count) and the margin estimate
(`memorization_margin`) and compared with the plain score of `--reference` models drawn from
the models outside the draw (disjoint from it, so its noise is independent):
  spearman     rank correlation over the real examples both score (all of them: the plain
               scores of examples every model gets right tie at exactly 0)
  spearman_c   the same over the CONTESTED examples, those some reference model gets wrong
               (where there is an order to agree on)
  mad          mean absolute difference over the examples both score
  precision, recall   of the reference's memorized set (score > the run's threshold); an
               unscored (NaN) example is not memorized
  planted      changed labels (`--planted`: make_subset.py's `changed_index`) among the top
               k of the run's ranking (k = their number): by the plain
               score, ties broken by the margin estimate (`Run.ranking`), and by the plain
               score alone (stable, by index), as before the margins
Also: the two estimators' mean and mean absolute difference over all the run's models; and,
per K, each draw's split-half reliability (metrics.json's) against the Spearman correlation
of two disjoint draws over the contested examples of either, both estimators. Prints markdown
tables (BENCHMARKS.md) and writes every number to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxmem import estimator, load_run, margins, reliability  # noqa: E402
from jaxmem.rundir.store import rank_order  # noqa: E402

ESTIMATORS = ("plain", "margin")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory with margins (a large K)")
    parser.add_argument("--reference", type=int, default=512, help="models in the reference")
    parser.add_argument("--sizes", default="8,16,32,64,128")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--planted", help="make_subset.py's .npz (changed_index)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    return parser.parse_args(argv)


class Models:
    """The run's included models at the last evaluation: masks, correctness, margins."""

    def __init__(self, run):
        self.masks = np.asarray(run.masks)
        self.units = np.asarray(run.margin_units)
        self.correct = self.units > 0
        self.real = run.real
        self.min_count = int(run.config["min_count"])
        self.threshold = float(run.config["threshold"])

    def __len__(self) -> int:
        return len(self.masks)

    def scores(self, rows, min_count: int | None = None) -> dict[str, np.ndarray]:
        """Both estimators over the models `rows`; canaries NaN."""
        masks = self.masks[rows]
        plain = estimator.memorization_scores(masks, self.correct[rows],
                                              min_count or self.min_count)
        sums = margins.MarginSums.of(self.units[rows][None], masks, np.ones(len(rows), bool))
        margin = margins.memorization_margin(masks.sum(0), (~masks).sum(0), sums)
        return {"plain": np.where(self.real, plain["memorization"], np.nan),
                "margin": np.where(self.real, margin["memorization_margin"][0], np.nan),
                "contested": self.real & ~self.correct[rows].all(axis=0)}


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0]) if len(a) > 2 and np.ptp(a) and np.ptp(b) else np.nan


def agreement(estimate, reference, contested, threshold: float) -> dict[str, float]:
    both = np.isfinite(estimate) & np.isfinite(reference)
    hard = both & contested
    truth = np.nan_to_num(reference, nan=-np.inf) > threshold
    found = np.nan_to_num(estimate, nan=-np.inf) > threshold
    return {"spearman": spearman(estimate[both], reference[both]),
            "spearman_c": spearman(estimate[hard], reference[hard]),
            "mad": float(np.abs(estimate[both] - reference[both]).mean()),
            "precision": float((found & truth).sum() / max(found.sum(), 1)),
            "recall": float((found & truth).sum() / max(truth.sum(), 1)),
            "scored": float(both.mean())}


def planted_in_top(scores: dict, changed: np.ndarray, real: np.ndarray) -> dict[str, int]:
    """Changed labels among the top len(changed) real examples, with and without ties broken
    by the margin estimate."""
    k = len(changed)
    ranked = rank_order(scores["plain"], scores["margin"])
    plain_only = np.argsort(-np.nan_to_num(scores["plain"], nan=-np.inf), kind="stable")
    return {name: int(np.isin(order[real[order]][:k], changed).sum())
            for name, order in (("ties_by_margin", ranked), ("plain_only", plain_only))}


def measure(models: Models, sizes, draws: int, reference: int, seed: int,
            changed: np.ndarray | None) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(models))
    everything = np.arange(len(models))
    results = {"models": len(models), "reference": reference, "draws": draws, "sizes": {}}
    for size in sizes:
        if draws * size > len(models) or len(models) - size < reference:
            print(f"K = {size}: {draws} disjoint draws and a reference of {reference} need "
                  f"more than the run's {len(models)} models; skipped", file=sys.stderr)
            continue
        rows = []
        for d in range(draws):
            draw = np.sort(order[d * size:(d + 1) * size])
            rest = np.setdiff1d(everything, draw)
            ref = models.scores(np.sort(rng.choice(rest, reference, replace=False)))
            mine = models.scores(draw)
            row = {name: agreement(mine[name], ref["plain"], ref["contested"],
                                   models.threshold) for name in ESTIMATORS}
            if changed is not None:
                row["planted"] = planted_in_top(mine, changed, models.real)
            split = reliability.split_half(models.masks[draw], models.correct[draw],
                                           models.units[draw], seed=d, examples=models.real)
            row["split_half"] = {name: (split[name] or {}).get("reliability")
                                 for name in ESTIMATORS}
            row["plain_models_for_margin"] = (split["margin"] or {}).get(
                "plain_models_for_same")
            rows.append(row)
        results["sizes"][size] = {"draws": rows, "disjoint": disjoint_agreement(
            models, order, size, draws)}
    mine = models.scores(everything)
    both = np.isfinite(mine["plain"]) & np.isfinite(mine["margin"])
    gap = mine["margin"][both] - mine["plain"][both]
    results["all_models"] = {"mean_difference": float(gap.mean()),
                             "mean_abs_difference": float(np.abs(gap).mean()),
                             "max_abs_difference": float(np.abs(gap).max())}
    return results


def disjoint_agreement(models: Models, order, size: int, draws: int) -> dict[str, float]:
    """Mean Spearman correlation of disjoint pairs of draws (draws 0-1, 2-3, ...) over the
    real examples contested in either, scored by both (min_count 2, the split halves')."""
    values = {name: [] for name in ESTIMATORS}
    for d in range(0, draws - 1, 2):
        a, b = (models.scores(np.sort(order[i * size:(i + 1) * size]), 2) for i in (d, d + 1))
        rows = (a["contested"] | b["contested"]) & np.isfinite(a["plain"]) & np.isfinite(
            b["plain"])
        for name in ESTIMATORS:
            values[name].append(spearman(a[name][rows], b[name][rows]))
    return {name: float(np.nanmean(v)) if v else None for name, v in values.items()}


def mean_of(rows: list[dict], *keys) -> float:
    values = []
    for row in rows:
        for key in keys:
            row = row.get(key) if isinstance(row, dict) else None
        values.append(np.nan if row is None else row)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def tables(results: dict, changed: np.ndarray | None) -> str:
    lines = [f"{results['models']} models; each K: {results['draws']} disjoint draws, each "
             f"against the plain score of {results['reference']} other models", "",
             "| K | estimator | Spearman | Spearman, contested | mean abs. diff. | precision "
             "| recall |" + (f" changed labels in top {len(changed)} |" if changed is not None
                             else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if changed is not None else "")]
    for size, entry in results["sizes"].items():
        for name in ESTIMATORS:
            cells = [mean_of(entry["draws"], name, key) for key in
                     ("spearman", "spearman_c", "mad", "precision", "recall")]
            line = (f"| {size} | {name} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.4f} | "
                    f"{cells[3]:.3f} | {cells[4]:.3f} |")
            if changed is not None:
                key = "ties_by_margin" if name == "margin" else "plain_only"
                line += f" {mean_of(entry['draws'], 'planted', key):.1f} |"
            lines.append(line)
    lines += ["", "| K | split-half reliability, plain | two disjoint draws, plain | split-half, "
              "margin | two disjoint draws, margin | plain models for the margin's |",
              "|---|---|---|---|---|---|"]
    for size, entry in results["sizes"].items():
        half = [mean_of(entry["draws"], "split_half", n) for n in ESTIMATORS]
        pair = [entry["disjoint"][n] for n in ESTIMATORS]
        plain_models = mean_of(entry["draws"], "plain_models_for_margin")
        lines.append(f"| {size} | {half[0]:.3f} | {_fmt(pair[0])} | {half[1]:.3f} | "
                     f"{_fmt(pair[1])} | {plain_models:.0f} |")
    gap = results["all_models"]
    lines += ["", f"All {results['models']} models: margin minus plain estimate, mean "
              f"{gap['mean_difference']:+.4f}, mean absolute {gap['mean_abs_difference']:.4f}, "
              f"largest {gap['max_abs_difference']:.3f}"]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    run = load_run(args.run)
    if not run.has_margins:
        print(f"error: {args.run} has no margins", file=sys.stderr)
        return 2
    changed = None
    if args.planted:
        with np.load(args.planted) as planted:
            changed = planted["changed_index"]
    results = measure(Models(run), [int(s) for s in args.sizes.split(",")], args.draws,
                      args.reference, args.seed, changed)
    print(tables(results, changed))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
