"""The paper-scale rehearsal on a CPU: the host side of the K = 2,000 CIFAR-10 run, and a real
CPU run of 2,000 tiny models, each step timed with its peak resident memory next to what the
run's plan (jaxmem/train/plan.py) predicts.

    python experiments/benchmarks/rehearsal.py --out=/tmp/rehearsal --json=rehearsal.json

Steps, each in a process of its own (wall time; peak RSS from the kernel's account of the
child, wait4's ru_maxrss):
  write   synthetic correctness of K = 2,000 models on N = 50,000 + 10,000 examples at E = 17
          evaluations (easy, memorized, transient and hard examples; a few planted
          high-influence pairs), held packed as a finished run holds it, through the run's
          own writer (`write_run`: scores, p-values, noise floor, files). Predicted: the
          process's resident memory before it + the masks + the plan's results and writing.
  load    `jaxmem.load_run`, every epoch's correctness read once, the p-values at another
          threshold (counts recomputed), the memorized sets.
  export  `python -m jaxmem.export RUN`.
  report  `python -m jaxmem.report RUN --no-galleries` (no CIFAR images here).
  train   `python experiments/run.py --dataset=digits --arch=tiny_cnn --num-models=2000
          --epochs=1 --host-memory=...`: the plan chooses the waves within the budget;
          predicted: the plan line's host peak.
Targets (the paper's run on one node): each step under 10 minutes on 2 cores, every peak under
12 GB, each prediction within 25% of the measured peak. Numbers: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = ("write", "load", "export", "report", "train")
# Share of each kind of training example (easy: right either way; memorized: right only when
# trained on; transient: memorized early, generalised later; hard: wrong either way).
KINDS = {"easy": 0.75, "memorized": 0.05, "transient": 0.05, "hard": 0.15}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs and their outputs")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--num-models", type=int, default=2000)
    parser.add_argument("--num-train", type=int, default=50_000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument("--evaluations", type=int, default=17)
    parser.add_argument("--train-models", type=int, default=2000, help="K of the train step")
    parser.add_argument("--host-memory", default="8G", help="the train step's --host-memory")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def vm_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    return 0


def paper_config(args):
    """The paper's settings (17 evaluations: after epochs 6, 12, ..., 96 and 100), or with
    another --evaluations as many epochs, each evaluated."""
    from jaxmem.config import Config

    epochs, every = (100, 6) if args.evaluations == 17 else (args.evaluations, 1)
    return Config(arch="small_vgg", dataset="cifar10", num_models=args.num_models,
                  epochs=epochs, eval_every=every)


def shapes(args, config):
    from jaxmem.train.plan import RunShapes

    return RunShapes(args.num_models, args.num_train, args.num_test, 10, args.evaluations,
                     config.epochs, 0, 1024)


def synthetic_result(args, config, seed: int = 0):
    """The EnsembleResult a finished run holds, built packed block by block of models (never
    the [E, K, N] bools)."""
    from jaxmem.margins import MarginSums
    from jaxmem.rundir import EnsembleResult, PackedCorrectness
    from jaxmem.rundir.heldout import HeldoutSums

    rng = np.random.default_rng(seed)
    k, n, n_test, e = args.num_models, args.num_train, args.num_test, args.evaluations
    kind = rng.choice(len(KINDS), size=n, p=list(KINDS.values()))
    progress = np.asarray(config.eval_epochs(), np.float64) / config.epochs
    p_in = np.stack([np.select([kind == 0, kind == 1, kind == 2], [
        np.minimum(1, 0.3 + t), np.full(n, min(1.0, t)), np.full(n, min(1.0, 2 * t))], 0.05)
        for t in progress])  # [E, N]
    p_out = np.stack([np.select([kind == 0, kind == 1, kind == 2], [
        np.minimum(1, 0.3 + t), 0.1, max(0.05, 2 * t - 1)], 0.05) for t in progress])
    test_p = rng.uniform(0.2, 0.95, n_test)[None] * progress[:, None]  # [E, N_test]
    planted = np.flatnonzero(kind == 1)[:5]  # test example j right exactly when planted[j] in
    masks = np.zeros((k, n), bool)
    subset = round(0.7 * n)
    correct = PackedCorrectness.zeros(e, k, n)
    correct_test = PackedCorrectness.zeros(e, k, n_test)
    margins = np.zeros((k, n), np.int16)
    block = 50
    for start in range(0, k, block):
        rows = slice(start, min(start + block, k))
        count = rows.stop - rows.start
        chosen = np.argsort(rng.random((count, n)), axis=1)[:, :subset]
        np.put_along_axis(masks[rows], chosen, True, axis=1)
        for epoch in range(e):
            draws = rng.random((count, n))
            bools = np.where(masks[rows], draws < p_in[epoch], draws < p_out[epoch])
            correct.bits[epoch, rows] = np.packbits(bools, axis=-1)
            tests = rng.random((count, n_test)) < test_p[epoch]
            tests[:, :len(planted)] = masks[rows][:, planted]
            correct_test.bits[epoch, rows] = np.packbits(tests, axis=-1)
        units = rng.integers(1, 3000, (count, n), dtype=np.int16)
        margins[rows] = np.where(bools, units, -units)
    predicted = rng.integers(0, 10, (1, n))
    heldout = HeldoutSums.zeros(n, 10)
    heldout.add(0, predicted, np.eye(10, dtype=np.float32)[predicted], np.ones((1, n), bool))
    sums = MarginSums(rng.integers(0, 2**40, (e, 4, n)))
    loss = np.tile(np.linspace(2.0, 0.05, config.epochs)[:, None], (1, k))
    return EnsembleResult(np.arange(k), masks, config.eval_epochs(), correct, correct_test,
                          loss, 1 - loss / 2, devices=["cpu"], heldout=heldout,
                          margins=margins, margin_sums=sums)


def child_write(args) -> dict:
    from jaxmem.rundir import DataInfo, write_run

    start = vm_field("VmRSS:")
    config = paper_config(args)
    settings = config.to_dict()
    rng = np.random.default_rng(1)
    info = DataInfo("cifar10", 10, (32, 32, 3), rng.integers(0, 10, args.num_train),
                    rng.integers(0, 10, args.num_test), np.arange(args.num_train), {})
    tic = time.perf_counter()
    result = synthetic_result(args, config)
    built = time.perf_counter() - tic
    held = vm_field("VmRSS:")
    tic = time.perf_counter()
    write_run(run_dir(args), settings, info, result, 1.0, {"num_params": 490_000})
    plan = shapes(args, config)
    results = args.num_models * plan.result_per_model + plan.sums
    return {"built_seconds": built, "write_seconds": time.perf_counter() - tic,
            "rss_before_bytes": start, "rss_holding_result_bytes": held,
            "predicted_peak_bytes": start + result.masks.nbytes + results
            + plan.writing(settings["null_permutations"]),
            "planned_results_bytes": results, "disk_bytes": folder_bytes(run_dir(args)),
            "planned_disk_bytes": sum(plan.run_directory(settings["null_permutations"])
                                      .values())}


def child_load(args) -> dict:
    import jaxmem

    run = jaxmem.load_run(run_dir(args))
    epochs = run.correct_epochs()
    ones = sum(int(epochs[e].sum()) for e in range(len(epochs)))  # every epoch, once
    pvalues = run.threshold_pvalues(0.3)  # another threshold: counts recomputed
    return {"correct_bits_set": ones, "memorized_at_0.3": len(run.memorized(0.3)),
            "pvalues_below_0.01_at_0.3": int(np.nansum(pvalues < 0.01)),
            "memorized_fdr": len(run.memorized(fdr=0.05)),
            "memorized": run.metrics["memorized_count"]}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, files in os.walk(path) for name in files)


def run_dir(args) -> str:
    return os.path.join(args.out, "paper-scale")


def measure(command: list[str], env: dict | None = None) -> dict:
    """Run `command`; its wall time, peak RSS (ru_maxrss of the child), status and output."""
    load = os.getloadavg()
    tic = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, cwd=ROOT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(command), "seconds": time.perf_counter() - tic,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "status": child.returncode,
            "load_before": load, "load_after": os.getloadavg(), "output_tail": output[-3000:]}


def step(args, name: str) -> dict:
    python = sys.executable
    if name in ("write", "load"):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if v is not None and k not in ("child", "json", "steps")]
        record = measure([python, __file__, *flags, f"--child={name}"])
        found = re.findall(r"^RESULT (.*)$", record["output_tail"], re.M)
        record.update(json.loads(found[-1]) if found else {})
    elif name == "export":
        record = measure([python, "-m", "jaxmem.export", run_dir(args)])
    elif name == "report":
        record = measure([python, "-m", "jaxmem.report", run_dir(args), "--no-galleries"])
    else:
        out = os.path.join(args.out, "tiny-digits")
        record = measure([python, os.path.join(ROOT, "experiments", "run.py"),
                          "--dataset=digits", "--arch=tiny_cnn",
                          f"--num-models={args.train_models}", "--epochs=1", f"--out={out}",
                          f"--host-memory={args.host_memory}", "--overwrite", "--no-progress"])
        if record["status"] == 0:
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            plan = metrics["memory_plan"]
            record.update(predicted_peak_bytes=plan["host_peak_bytes_planned"],
                          waves=len(metrics["peak_memory_bytes_per_wave"]),
                          peak_bytes_per_wave=metrics["peak_memory_bytes_per_wave"],
                          models_per_wave=plan["models_per_wave"],
                          **{f"{part}_seconds": metrics[f"{part}_seconds"]
                             for part in ("compile", "train", "eval", "checkpoint")},
                          plan_lines=re.findall(r"^(?:plan|memory): .*$",
                                                record["output_tail"], re.M))
    if "predicted_peak_bytes" in record:
        record["predicted_over_measured"] = (record["predicted_peak_bytes"]
                                             / record["peak_rss_bytes"])
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = {"write": child_write, "load": child_load}[args.child](args)
        print("RESULT " + json.dumps(result))
        return 0
    os.makedirs(args.out, exist_ok=True)
    records = {}
    for name in args.steps.split(","):
        records[name] = record = step(args, name)
        predicted = record.get("predicted_peak_bytes")
        print(f"{name:7s} {record['seconds']:7.1f} s  peak {record['peak_rss_bytes'] / 2**30:6.2f}"
              f" GiB" + (f"  predicted {predicted / 2**30:6.2f} GiB "
                         f"({100 * (record['predicted_over_measured'] - 1):+.0f}%)"
                         if predicted else "") + f"  status {record['status']}  load "
              f"{record['load_before'][0]:.1f} -> {record['load_after'][0]:.1f}", flush=True)
        if record["status"] != 0:
            print(record["output_tail"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if all(r["status"] == 0 for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
