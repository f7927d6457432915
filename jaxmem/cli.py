"""Command line of `experiments/run.py`: one flag per Config field, errors on one line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from jaxmem import recipes, reliability
from jaxmem.config import Config
from jaxmem.errors import DiskFull, UserError


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(Config)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and args else hint
    return base


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="experiments/run.py",
        description="Train an ensemble of models on random subsets and write memorization "
                    "scores (Feldman & Zhang) to a run directory.",
        epilog="Exit status: 0 done; 2 bad input (one-line error); 75 stopped by SIGTERM or "
               "SIGUSR1 after checkpointing the step in progress, or by a full disk while "
               "finished waves or checkpoints hold the work so far (rerun the same command "
               "with --resume); 130 interrupted by Ctrl-C (checkpoints kept; --resume).")
    # A flag not given is absent from the namespace (SUPPRESS), so the dataset's recipe can
    # choose it (jaxmem/recipes.py); the help shows Config's default.
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field)
        help_text = field.metadata.get("help", "")
        default = (" (default: the dataset's recipe)" if field.name in recipes.RECIPE_SETTINGS
                   else f" (default: {field.default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text + default)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                                metavar=kind.__name__.upper(), help=help_text + default)
    parser.add_argument("--out", help="run directory (default: runs/ARCH-DATASET-kK-sSEED)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and discard an interrupted run's work "
                             "(with --grow: discard an interrupted grow's work, keeping --out)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its checkpoints (<out>.partial; "
                             "<out>.grow.partial with --grow, <out>.pilot after a pilot), with any "
                             "wave size")
    parser.add_argument("--grow", action="store_true",
                        help="add models to the finished run at --out (same settings, fewer "
                             "models) up to --num-models, or until --until-se is met")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host run: call jax.distributed.initialize (cluster "
                             "auto-detection, or the three flags below)")
    parser.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, help="processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-archs", action="store_true",
                        help="print every architecture with its parameter count and exit")
    return parser


def list_archs() -> str:
    from jaxmem.models import ARCHS, param_count

    header = ("arch", "32x32x3, 10 cl.", "32x32x3, 100 cl.", "64x64x3, 200 cl.")
    lines = [f"{header[0]:<12} " + " ".join(f"{h:>16}" for h in header[1:])]
    for name in ARCHS:
        counts = [param_count(name, c, s) for c, s in
                  ((10, (32, 32, 3)), (100, (32, 32, 3)), (200, (64, 64, 3)))]
        lines.append(f"{name:<12} " + " ".join(f"{n:>16,}" for n in counts))
    return "\n".join(lines)


def summary(out: str, metrics: dict) -> str:
    return "\n".join([
        *(f"WARNING: {warning}" for warning in metrics.get("warnings", [])),
        f"memorized: {metrics['memorized_count']} examples with score > {metrics['threshold']}"
        f" ({metrics['low_count_examples']} examples flagged: fewer than "
        f"{metrics['min_count']} in- or held-out models, score NaN)",
        noise_line(metrics),
        *([reliability_line(metrics["reliability"])] if metrics.get("reliability") else []),
        *([pilot_line(metrics["pilot"])] if metrics.get("pilot") else []),
        *([f"canaries: {round(metrics['canary_recall'] * metrics['num_canaries'])} of "
           f"{metrics['num_canaries']} ({100 * metrics['canary_recall']:.0f}%) score above "
           f"{metrics['threshold']} (planted label changes, not in the count above)"]
          if metrics.get("num_canaries") else []),
        *([f"diverged and excluded: models {metrics['diverged_models']}"]
          if metrics["diverged_models"] else []),
        accuracy_line(metrics),
        time_line(metrics),
        f"run directory: {out}  (load with jaxmem.load_run({out!r}))",
        table_line(out),
    ])


def reliability_line(record: dict) -> str:
    return f"reliability: {reliability.describe(record)}"


def time_line(metrics: dict) -> str:
    share = (f" ({100 * metrics['eval_share']:.0f}% of the time training and evaluating)"
             if "eval_share" in metrics else "")  # runs written before it was recorded
    peak = (f", peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB"
            if metrics.get("peak_memory_bytes") else "")
    return (f"time: {metrics['wall_time_s']:.1f} s on {metrics['num_devices']} device(s), "
            f"{metrics['train_model_examples_per_s']:.0f} model-examples/s training, "
            f"{metrics['eval_model_examples_per_s']:.0f} evaluating{share}, "
            f"{metrics['seconds_per_model']:.2f} s/model, {metrics['models_per_hour']:.0f} "
            f"models/hour{peak}")


def accuracy_line(metrics: dict) -> str:
    if not metrics.get("num_included_models", metrics["num_models"]):
        return (f"accuracy: none: every one of the {metrics['num_models']} models diverged and "
                "was excluded, so there are no scores")
    return (f"accuracy: train (own subset) {metrics['train_acc']:.3f}, held-out "
            f"{metrics['heldout_acc']:.3f}, test {metrics['test_acc']:.3f} (mean over "
            f"{metrics['num_included_models']} included models)")


def table_line(out: str) -> str:
    """Where the run's table (one row per training example) is, or how to write it."""
    from jaxmem.export import default_table_path

    table = default_table_path(out)
    if os.path.exists(table):
        return f"table: {table} (one row per training example)"
    return (f"table: python -m jaxmem.export {out} writes {table} (one row per training "
            "example: scores, suggested labels, held-out accuracy)")


def pilot_line(pilot: dict) -> str:
    return (f"pilot: {pilot['found']}: trained {pilot['chosen_epochs']} epochs; the pilot "
            f"({pilot['models']} models) took {pilot['seconds']:.0f} s, "
            f"{100 * pilot['share_of_run']:.0f}% of the run")


def noise_line(metrics: dict) -> str:
    """The memorized count's noise floor and the memorized set at the false discovery rate,
    in one line."""
    null = metrics["noise_floor"]
    tested = (f"{metrics['memorized_fdr_count']} examples have a score above "
              f"{metrics['threshold']} at false discovery rate {metrics['fdr']:g} (at most "
              f"{100 * metrics['fdr']:g}% of them are expected to score {metrics['threshold']} "
              "or less in truth)")
    if not null["num_permutations"]:
        return f"noise floor: none (fewer than 2 included models to shuffle); {tested}"
    observed, mean, p95 = null["observed"][-1], null["mean"][-1], null["p95"][-1]
    verdict = "above" if observed > p95 else "NOT above"
    return (f"noise floor: membership shuffled across models {null['num_permutations']} times "
            f"gives {mean:.1f} on average (95th percentile {p95:.0f}), so the count is "
            f"{verdict} noise; {tested}")


def disk_full_line(full: DiskFull, overwrite: bool) -> str:
    """The one line of a run stopped by a full disk: where, how much room, what is kept and
    how to continue (a resume reuses every finished wave and checkpoint; --resume continues an
    interrupted --overwrite run too, replacing the old run directory once the new one is
    complete)."""
    kept = f"; the work so far is kept in {full.kept}" if full.kept else ""
    instead = " in place of --overwrite" if overwrite else ""
    return f"{full.problem}{kept}: free space, then rerun the same command with --resume{instead}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = None
    try:
        if args.list_archs:
            print(list_archs())
            return 0
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if hasattr(args, f.name)}
        import jax

        from jaxmem import data, load_run
        from jaxmem.train.preemption import EXIT_PREEMPTED, Preempted, remembered
        from jaxmem.train.runner import run, work_dir_for

        if args.distributed:
            jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                       args.process_id)
        if given.get("dtype") == "bfloat16" and jax.default_backend() == "cpu":
            # Default run, 6 epochs, 2-core CPU: training 2,130 vs 3,195 model-examples/s.
            print("note: bfloat16 trains about 1.5x slower than float32 on CPU (it pays off on "
                  "GPU and TPU)", file=sys.stderr)
        config, sources = recipes.resolve(given)
        slug = data.slug(config.dataset)
        out = args.out or f"runs/{config.arch}-{slug}-k{config.num_models}-s{config.seed}"
        try:
            with remembered() as outside:
                run(config, out, overwrite=args.overwrite, resume=args.resume,
                    progress=not args.no_progress, grow=args.grow, sources=sources)
                if jax.process_index() == 0:
                    print(summary(out, load_run(out).metrics))
            if outside.received:
                print(f"{outside.received} arrived while no model was training; the run "
                      "directory was completed", file=sys.stderr)
        except Preempted as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            return EXIT_PREEMPTED
        except DiskFull as full:
            print(f"error: {disk_full_line(full, args.overwrite)}", file=sys.stderr)
            return EXIT_PREEMPTED if full.kept else 2
        except KeyboardInterrupt:
            pilot = f"{os.path.abspath(out)}.pilot"  # the pilot's work, when one ran
            kept = pilot if os.path.exists(pilot) else work_dir_for(out, args.grow)
            print("interrupted; no run directory was written; its checkpoints are kept in "
                  f"{kept}: rerun with --resume", file=sys.stderr)
            return 130
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

