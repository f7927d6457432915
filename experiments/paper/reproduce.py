"""Reproduce the paper's Figures 1-4, Table 1 and summary numbers from ensembles of runs.

    python experiments/paper/reproduce.py --quick --out=results/paper_quick

Expected runtime: 10 minutes on 2 idle CPU cores (measured 9 min 45 s: training 101 + 192 +
282 s, the rest analysis and the report) for 3 runs of QUICK_NUM_MODELS = 24 models on the
embedded `digits` data with its recipe (18 epochs of batch 32, lr 0.1, no translation):
tiny_cnn plus two sizes of the VGG family, small_vgg and med_vgg.
Measured result: every model fits its own subset (accuracy 1.000), test accuracy 98.7 / 98.7 /
98.9 %; memorized at the last epoch 13 / 18 / 17 against a noise floor (membership shuffled
across models 100 times) of mean 0.9 / 1.1 / 0.8 and 95th percentile 3 / 3 / 2, of which 4 / 1
/ 1 pass a per-example test of score > 0 at a 5% false discovery rate (24 models leave about 7
held-out models per example: little power). By epoch, tiny_cnn 55 35 18 14 15 15 15 13 13
against a 95th percentile of 42 8 3 3 3 3 3 3 3; small_vgg 51 73 41 32 25 23 24 19 18 against
34 45 16 7 4 3 4 3 3; med_vgg 47 51 34 22 24 18 18 16 17 against 18 24 15 6 4 3 2 2 2. So
early counts are mostly noise (at epoch 4 small_vgg's noise floor alone averages 34), yet the
rise then fall survives it: the counts above the floor peak at epoch 4 / 4 / 2 (27 / 28 / 29)
and fall by 63 / 46 / 48 % by epoch 18. The epoch-wise transient sets (memorized at the peak,
not at the end: 24 / 67 / 35 examples) hold 1 / 0 / 0 examples that pass the per-example test:
which examples are transient is not resolved at this K. Pearson r of count vs gap -0.04, p =
0.97 (3 runs: no evidence either way at this size).
Result, in OUT: fig1_memorization_vs_size.png, fig2_memorization_vs_epoch_digits.png,
fig3_memorization_vs_gap.png, fig4_scores_by_run_digits.png, fig4_scores_by_epoch_*.png,
table1.md, summary.json and summary.md (Pearson r of memorized count vs train-test gap, the
onset/peak/final epochs of memorization of every run, model-wise and epoch-wise transient
sets), report.html, and the run directories under OUT/runs/. The paper's claims to compare
against: memorization starts after a stretch without any, rises to a peak and then declines
(Figure 2), and the memorized count correlates positively with the train-test gap (Figure 3).

    python experiments/paper/reproduce.py --out=results/paper --data-dir=DATA

runs the paper's full grid (FULL_ARCHS x FULL_DATASETS, 2,000 models, 100 epochs each):
accelerator-days; it is resumable, a run whose directory is complete is skipped, so rerun the
same command after an interruption. `--skip-training` only analyses the complete runs found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

# --- quick mode: sizes tuned to the 20-minute budget on 2 CPU cores --------------------------
QUICK_DATASETS = ("digits",)
QUICK_ARCHS = ("tiny_cnn", "small_vgg", "med_vgg")  # one "other" and two sizes of VGG
QUICK_NUM_MODELS = 24  # at r = 0.7 about 7 held-out models per example (min_count is 5)
QUICK_EVAL_EVERY = 2  # the rest (epochs, batch, lr, no translation) is digits' recipe
# --- the paper's grid -------------------------------------------------------------------------
FULL_DATASETS = ("cifar10", "cifar100", "tiny_imagenet")
FULL_ARCHS = ("small_vgg", "med_vgg", "large_vgg", "vgg19", "resnet18", "resnet50",
              "vit_tiny", "vit_small")
FULL_NUM_MODELS = 2000
FULL_EVAL_EVERY = 5  # the rest is the paper's recipe (jaxmem/recipes.py)


def grid(quick: bool, archs: Sequence[str] | None = None,
         datasets: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """[(dataset, arch)] of the chosen mode, optionally restricted."""
    archs = archs or (QUICK_ARCHS if quick else FULL_ARCHS)
    datasets = datasets or (QUICK_DATASETS if quick else FULL_DATASETS)
    return [(dataset, arch) for dataset in datasets for arch in archs]


def run_dir(out: str, dataset: str, arch: str) -> str:
    name = os.path.splitext(os.path.basename(dataset.rstrip("/")))[0]
    return os.path.join(out, "runs", f"{name}-{arch}")


def is_complete(path: str) -> bool:
    """A run directory is complete when every file of the contract is there (the trainer
    writes it atomically, so a present directory is a finished one)."""
    names = ("config.json", "masks.npy", "correct_train.npy", "correct_test.npy",
             "correct_by_epoch.npz", "scores.npz", "metrics.json")
    return all(os.path.exists(os.path.join(path, name)) for name in names)


def make_config(dataset: str, arch: str, quick: bool, args: argparse.Namespace):
    """The run's Config: the grid's sizes and the flags given, the dataset's recipe for the
    rest (as `experiments/run.py` does), with where each setting came from."""
    from jaxmem import recipes

    given = {"arch": arch, "dataset": dataset, "data_dir": args.data_dir, "seed": args.seed,
             "num_models": QUICK_NUM_MODELS if quick else FULL_NUM_MODELS,
             "eval_every": QUICK_EVAL_EVERY if quick else FULL_EVAL_EVERY}
    for name in ("num_models", "epochs", "eval_every", "models_per_wave"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    return recipes.resolve(given)


def train_missing(out: str, quick: bool, args: argparse.Namespace) -> None:
    """Train every run of the grid whose directory is not complete yet."""
    from jaxmem.train.runner import run, work_dir_of

    for dataset, arch in grid(quick, args.archs, args.datasets):
        path = run_dir(out, dataset, arch)
        if is_complete(path):
            print(f"[skip] {path} is complete", flush=True)
            continue
        config, sources = make_config(dataset, arch, quick, args)
        print(f"[train] {dataset}/{arch}: {config.num_models} models x {config.epochs} epochs",
              flush=True)
        started = time.perf_counter()
        resume = os.path.isdir(work_dir_of(path))  # an interrupted run continues
        run(config, out=path, resume=resume, progress=not args.quiet, sources=sources)
        print(f"[done] {path} in {time.perf_counter() - started:.0f} s", flush=True)


def analyze(run_dirs: Sequence[str], out: str, report: bool = True) -> dict:
    """Write the figures, Table 1, the summary (and the HTML report) for complete runs."""
    from jaxmem.analysis import figures, stats, tables
    from jaxmem.rundir.store import load_run

    runs = tables.sorted_runs([load_run(path) for path in run_dirs])
    by_dataset: dict[str, list] = {}
    for run in runs:
        by_dataset.setdefault(stats.dataset_name(run), []).append(run)
    written = [figures.memorization_vs_size(runs, path=os.path.join(
                   out, "fig1_memorization_vs_size.png")),
               figures.memorization_vs_gap(runs, path=os.path.join(
                   out, "fig3_memorization_vs_gap.png"))]
    for dataset, dataset_runs in by_dataset.items():
        written.append(figures.memorization_curve(dataset_runs, path=os.path.join(
            out, f"fig2_memorization_vs_epoch_{dataset}.png")))
        written.append(figures.run_score_histograms(dataset_runs, path=os.path.join(
            out, f"fig4_scores_by_run_{dataset}.png")))
    for run in runs:
        name = stats.run_label(run).replace("/", "-")
        written.append(figures.epoch_score_histograms(run, path=os.path.join(
            out, f"fig4_scores_by_epoch_{name}.png")))
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write(tables.table1(runs))
    summary = tables.paper_summary(runs)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(tables.summary_markdown(summary))
    if report:
        from jaxmem.report import build_report

        build_report([run.path for run in runs], os.path.join(out, "report.html"))
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the small CPU-sized grid on the embedded digits data")
    parser.add_argument("--out", default=None,
                        help="output folder (default results/paper_quick or results/paper)")
    parser.add_argument("--data-dir", default=None, help="where CIFAR / Tiny ImageNet live")
    parser.add_argument("--archs", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of the grid's architectures")
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of the grid's datasets")
    parser.add_argument("--num-models", type=int, default=None, help="override run size")
    parser.add_argument("--epochs", type=int, default=None, help="override run size")
    parser.add_argument("--eval-every", type=int, default=None, help="override run size")
    parser.add_argument("--models-per-wave", type=int, default=None,
                        help="models per jitted step (memory); does not change results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true",
                        help="only analyse the complete runs already in OUT/runs")
    parser.add_argument("--no-report", action="store_true", help="do not write report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxmem.errors import UserError

    args = parse_args(argv)
    out = args.out or ("results/paper_quick" if args.quick else "results/paper")
    started = time.perf_counter()
    try:
        os.makedirs(out, exist_ok=True)
        if not args.skip_training:
            train_missing(out, args.quick, args)
        paths = [run_dir(out, d, a) for d, a in grid(args.quick, args.archs, args.datasets)]
        complete = [p for p in paths if is_complete(p)]
        for path in sorted(set(paths) - set(complete)):
            print(f"[missing] {path}", flush=True)
        if not complete:
            raise UserError(f"no complete run directories under {os.path.join(out, 'runs')}")
        summary = analyze(complete, out, not args.no_report)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for entry in summary["runs"]:
        floor = entry["noise_floor_by_epoch"]
        print(f"{entry['label']}: memorized by epoch {floor['observed']} against a noise floor "
              f"(95th percentile) of {[round(p) for p in floor['p95']]}; rise then fall above "
              f"noise: {'yes' if entry['stages']['rise_then_fall'] else 'no'}", flush=True)
    corr = summary["gap_correlation"]
    print(f"{len(complete)} runs analysed in {time.perf_counter() - started:.0f} s; "
          f"Pearson r (memorized vs gap) = {corr['pearson_r']}, p = {corr['p_value']}")
    print(os.path.abspath(out))
    return 0


if __name__ == "__main__":
    from jaxmem.train import lowering

    lowering.reexec_with_process_env()  # allocator settings: BENCHMARKS.md
    sys.exit(main())
