"""Ensemble training throughput against its peers, on the current backend, in one process.

    python experiments/benchmarks/bench.py --arch=small_vgg --models=8 --batch-size=256 \\
        --json=bench.json

takes ~3 min on an idle 2-core CPU (compiles dominate; --seconds of timing per variant).
Measured idle there (M=4, B=128; BENCHMARKS.md): on an AVX2 EPYC, ensemble im2col/vmap 168
model-examples/s at 33.1 GFLOP/s = 0.46 of the 72.6 GFLOP/s matmul peak, sequential 173 (im2col
convs) and 113 (lax convs); on an AVX-512 Xeon, ensemble 246, sequential 259 / 247, PyTorch
832 (over_pytorch 0.30; 0.29 at B=512).

Variants, each timed for --seconds after compiling:
  (a) ensemble   jaxmem's step as the trainer runs it (Ensemble(...).train_step: on-device
                 dataset, each model's batch gathered from its own subset, per-model
                 augmentation, donated states), with the lowering of --conv-impl/--ensemble
                 ("auto" = jaxmem.train.lowering.BEST);
  (b) sequential the same M models one after another with ONE jitted single-model step (no
                 model axis at all); timed with conv "xla" and with the ensemble's conv impl,
                 and the faster of the two is the baseline (the honest one);
  (c) vmap       plain `jax.vmap` of the single-model step with lax convs ("xla"/"vmap");
  (d) matmul     the backend's dense matmul peak (4096^2 float32 on CPU, 8192^2 bfloat16
                 on GPU/TPU);
  (e) pytorch    what a user would run instead: PyTorch eager, one model at a time, same
                 layout, optimiser, batch and flips (torch_baseline.py beside this script;
                 skipped with a note when torch is not installed); `over_pytorch` = (a) / (e);
  plus evaluation: Ensemble.evaluate (forward only, running BatchNorm statistics) on the
  evaluation's own lowering (jaxmem.train.lowering.EVAL_BEST unless --conv-impl/--ensemble
  are given).
GFLOP/s = XLA's cost analysis of the compiled step (flops) / measured step time.
--sweep=1,2,4,8,16 repeats (a) for each number of models per wave (throughput vs M).
Images: random uint8 32x32x3, 10 classes (--dataset=NAME uses a registered dataset instead).
--project=K,E (default 2000,100) turns the fastest M's training and evaluation rates into the
hours K models x E epochs take on CIFAR-10 (same image shapes as the random images). A sweep
stops at the first M that runs out of device memory, or whose arrays exceed the backend's
element limit (jaxmem/train/array_sizes.py: on GPU such a step kills the process with an
illegal address; --no-element-limit runs it anyway, to see whether it still does).
gpu_bench.sh (beside it) is the GPU run.
The process re-executes itself once with the allocator settings of
`jaxmem.train.lowering.process_env()` (on a VM, page faults on fresh buffers cost more than
the convolutions otherwise); --no-tune-env measures without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jaxmem.timing import seconds_per_call
from jaxmem.train import lowering


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vgg")
    parser.add_argument("--models", type=int, default=4, help="models per wave (M)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--ensemble", default="auto",
                        help="model-axis mapping: auto, vmap, vmap:C, map or unroll")
    parser.add_argument("--sweep", default="", help="comma-separated M values, e.g. 1,2,4,8,16")
    parser.add_argument("--dataset", default=None, help="registered dataset instead of random")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per variant")
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--skip", default="",
                        help="comma-separated: sequential,vmap,eval,matmul,pytorch")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-element-limit", action="store_true",
                        help="run wave sizes whose arrays exceed the backend's element limit")
    parser.add_argument("--project", default="2000,100",
                        help="K,E: project the time of K models x E epochs on CIFAR-10")
    parser.add_argument("--no-tune-env", action="store_true",
                        help="do not re-execute with lowering.process_env()")
    args = parser.parse_args(argv)
    try:
        args.project_models, args.project_epochs = (int(v) for v in args.project.split(","))
    except ValueError:
        parser.error(f"--project must be K,E (two integers), got {args.project!r}")
    return args


def compiled_flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def load_average() -> float:
    return os.getloadavg()[0]


class Bench:
    """Builds the specs, data and functions shared by every variant."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        from jaxmem import data
        from jaxmem.config import Config
        from jaxmem.data.dataset import Dataset
        from jaxmem.masks import subset_masks
        from jaxmem.train import loop, orders
        from jaxmem.train.optim import schedule_for

        self.args, self.jax, self.jnp = args, jax, jnp
        batch = args.batch_size
        if args.dataset:
            dataset = data.load(args.dataset)
        else:
            rng = np.random.default_rng(0)
            n = 10 * batch  # subsets of 7 whole batches
            dataset = Dataset("random", rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                              rng.integers(0, 10, n).astype(np.int32),
                              rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
                              rng.integers(0, 10, batch).astype(np.int32), 10,
                              (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, 4)
        self.dataset = dataset
        self.steps = orders.steps_per_epoch(dataset.num_train, 0.7, batch)
        self.conv_impl, self.strategy = lowering.resolve(args.conv_impl, args.ensemble,
                                                         arch=args.arch)
        self.eval_conv, self.eval_strategy, _ = lowering.resolve_eval(
            args.conv_impl, args.ensemble, args.eval_batch_size, arch=args.arch)
        self.config = Config(arch=args.arch, batch_size=batch, dtype=args.dtype,
                             conv_impl=self.conv_impl, ensemble=self.strategy)
        self.spec = loop.build_spec(self.config, dataset)
        self.schedule = schedule_for(self.config, self.steps)
        self.x = jax.device_put(dataset.x_train)
        self.y = jax.device_put(dataset.y_train)
        self.masks = subset_masks(0, np.arange(max(self.sweep_sizes(args))), dataset.num_train,
                                  0.7)
        # [M, S*B]: each model's own epoch order (as the trainer draws it)
        self.orders = orders.model_orders(0, np.arange(len(self.masks)), self.masks, 0,
                                        self.steps, batch)

    @staticmethod
    def sweep_sizes(args) -> list[int]:
        sweep = {int(m) for m in args.sweep.split(",") if m} | {args.models}
        return sorted(sweep)  # ascending: the first M that runs out of memory ends the sweep

    def spec_with(self, conv_impl: str):
        from jaxmem.train import loop

        return loop.build_spec(self.config, self.dataset, conv_impl)

    def largest_array(self, num_models: int) -> int | None:
        """Elements of the largest array a device holds for M models, where that exceeds
        the backend's element limit (None: within it, or no limit)."""
        from jaxmem.train import array_sizes
        from jaxmem.train.ensemble import Ensemble

        limit = array_sizes.ELEMENT_LIMIT.get(self.jax.default_backend())
        if limit is None:
            return None
        ensemble = Ensemble(self.spec, self.dataset.image_shape, self.args.batch_size,
                            strategy=self.strategy, eval_spec=self.spec_with(self.eval_conv),
                            eval_strategy=self.eval_strategy)
        sizes = array_sizes.per_model(ensemble, self.x, self.y, self.steps,
                                      self.args.eval_batch_size, self.schedule)
        per_device = -(-num_models // ensemble.num_devices)
        largest = array_sizes.largest_array(sizes, per_device, self.strategy,
                                            self.eval_strategy)
        return largest if largest > limit else None

    def ensemble_step(self, num_models: int, spec, strategy: str) -> dict:
        """Time Ensemble.train_step (and Ensemble.evaluate) for M models."""
        jax, jnp = self.jax, self.jnp
        from jaxmem import keys
        from jaxmem.train.ensemble import Ensemble

        ensemble = Ensemble(spec, self.dataset.image_shape, self.args.batch_size,
                            strategy=strategy, eval_spec=self.spec_with(self.eval_conv),
                            eval_strategy=self.eval_strategy)
        indices = np.arange(num_models)
        orders = jax.device_put(self.orders[:num_models], ensemble.model_sharding)
        states = ensemble.init(jax.device_put(
            jax.random.key_data(keys.model_keys(0, keys.INIT, indices)), ensemble.model_sharding))
        aug = jax.device_put(jax.random.key_data(keys.model_keys(0, keys.AUGMENT, indices)),
                             ensemble.model_sharding)
        totals = ensemble.zero_totals(num_models)
        tic = time.perf_counter()
        flops = compiled_flops(ensemble.train_step, states, totals, orders, aug, self.x, self.y,
                               0, self.schedule)
        holder = {"states": states, "totals": totals, "step": 0}

        def run():
            holder["states"], holder["totals"] = ensemble.train_step(
                holder["states"], holder["totals"], orders, aug, self.x, self.y,
                holder["step"] % self.steps, self.schedule)
            holder["step"] += 1
            return holder["totals"]

        jax.block_until_ready(run())
        compile_s = time.perf_counter() - tic
        load_before = load_average()
        seconds = seconds_per_call(run, self.args.seconds)
        result = self._row(num_models, seconds, flops, load_before)
        result["compile_s"] = compile_s
        if "eval" not in self.args.skip:
            ids = jnp.arange(self.args.eval_batch_size, dtype=jnp.int32) % self.dataset.num_train
            ev = lambda: ensemble.evaluate(holder["states"], self.x, self.y, ids)  # noqa: E731
            eval_seconds = seconds_per_call(ev, self.args.seconds / 2)
            result["eval_model_examples_per_s"] = (
                num_models * self.args.eval_batch_size / eval_seconds)
        return result

    def single_step(self, spec) -> dict:
        """One jitted single-model step (no model axis), gathering its batch from its own subset
        on device: how one would train the models one by one without jaxmem."""
        jax, jnp = self.jax, self.jnp
        from jaxmem.train import step as step_lib

        batch, num = self.args.batch_size, self.dataset.num_train
        order = self.orders[0]
        state = step_lib.init_state(spec, jax.random.key(0), self.dataset.image_shape)
        aug_key = jax.random.key(1)

        def one(state, step):
            ids = jax.lax.dynamic_slice(order, (step * batch,), (batch,))
            weights = (ids < num).astype(jnp.float32)
            ids = jnp.minimum(ids, num - 1)
            return step_lib.train_step(spec, state, self.x[ids], self.y[ids], ids, weights,
                                       aug_key, self.schedule)

        jitted = jax.jit(one, donate_argnums=(0,))
        flops = compiled_flops(jitted, state, 0)
        holder = {"state": state, "step": 0}

        def run():
            holder["state"], stats = jitted(holder["state"], holder["step"] % self.steps)
            holder["step"] += 1
            return stats

        load_before = load_average()
        seconds = seconds_per_call(run, self.args.seconds)
        return {"seconds_per_model_step": seconds, "flops_per_model_step": flops,
                "load_avg": load_before}

    def _row(self, num_models, seconds, flops, load_before) -> dict:
        return {"models": num_models, "ms_per_step": 1e3 * seconds,
                "model_examples_per_s": num_models * self.args.batch_size / seconds,
                "gflops": flops / seconds / 1e9, "flops_per_step": flops,
                "load_avg": max(load_before, load_average())}

    def matmul_peak(self) -> float:
        jax, jnp = self.jax, self.jnp
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        n = 4096 if jax.default_backend() == "cpu" else 8192
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a: a @ a)
        return 2 * n ** 3 / seconds_per_call(lambda: f(a), self.args.seconds / 2) / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_tune_env:
        lowering.reexec_with_process_env()
    import jax

    bench = Bench(args)
    sweep = Bench.sweep_sizes(args)
    backend = jax.default_backend()
    print(f"# {args.arch} batch {args.batch_size} {args.dtype} on {backend} "
          f"({jax.device_count()} device(s)); lowering {bench.conv_impl}/{bench.strategy}; "
          f"load avg {load_average():.2f}", flush=True)
    results = {"arch": args.arch, "batch_size": args.batch_size, "dtype": args.dtype,
               "backend": backend, "conv_impl": bench.conv_impl, "ensemble": bench.strategy,
               "process_env": {k: os.environ.get(k) for k in lowering.process_env()},
               "sweep": []}
    header = f"{'variant':<34}{'M':>4}{'ms/step':>10}{'model-ex/s':>12}{'GFLOP/s':>9}{'load':>6}"
    print(header, flush=True)

    def show(name, row):
        print(f"{name:<34}{row['models']:>4}{row['ms_per_step']:>10.1f}"
              f"{row['model_examples_per_s']:>12.0f}{row['gflops']:>9.1f}{row['load_avg']:>6.2f}",
              flush=True)

    if "matmul" not in args.skip:
        results["matmul_peak_gflops"] = bench.matmul_peak()
        print(f"{'matmul peak':<34}{'':>4}{'':>10}{'':>12}{results['matmul_peak_gflops']:>9.1f}"
              f"{load_average():>6.2f}", flush=True)
    singles = {}
    if "sequential" not in args.skip:
        for impl in dict.fromkeys(("xla", bench.conv_impl)):
            singles[impl] = bench.single_step(bench.spec_with(impl))
            row = bench._row(1, singles[impl]["seconds_per_model_step"],
                             singles[impl]["flops_per_model_step"], singles[impl]["load_avg"])
            show(f"sequential single ({impl})", row)
        best = min(singles, key=lambda k: singles[k]["seconds_per_model_step"])
        results["sequential"] = {"conv_impl": best, "per_impl": singles}
        save(results, args.json)
    if "pytorch" not in args.skip:
        results["pytorch"] = pytorch_baseline(bench)
        save(results, args.json)
    for num_models in sweep:
        largest = bench.largest_array(num_models)
        if largest is not None and not args.no_element_limit:
            print(f"{'ensemble: array above the limit':<34}{num_models:>4}  ({largest:,} "
                  "elements; larger M skipped)", flush=True)
            results["element_limit_at_models"] = num_models
            break
        try:
            row = bench.ensemble_step(num_models, bench.spec, bench.strategy)
        except Exception as error:  # jaxlib's XlaRuntimeError; only out-of-memory is expected
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            print(f"{'ensemble: out of device memory':<34}{num_models:>4}  (larger M skipped)",
                  flush=True)
            results["out_of_memory_at_models"] = num_models
            break
        if singles:
            single = singles[results["sequential"]["conv_impl"]]
            row["ensemble_over_sequential"] = (
                single["seconds_per_model_step"] * num_models / (row["ms_per_step"] / 1e3))
        show(f"ensemble {bench.conv_impl}/{bench.strategy}", row)
        results["sweep"].append(row)
        save(results, args.json)  # every finished row is kept, whatever stops the sweep
    main_row = next((r for r in results["sweep"] if r["models"] == args.models), None)
    if main_row is None:
        print(f"# --models={args.models} did not run (device memory or the element limit); "
              "pick a smaller M", flush=True)
        return 1
    results.update(model_examples_per_s=main_row["model_examples_per_s"],
                   ensemble_gflops=main_row["gflops"], models=args.models,
                   load_avg=main_row["load_avg"],
                   eval_model_examples_per_s=main_row.get("eval_model_examples_per_s"))
    if singles:
        single = singles[results["sequential"]["conv_impl"]]
        seq_seconds = single["seconds_per_model_step"] * args.models
        results["sequential_gflops"] = single["flops_per_model_step"] / (
            single["seconds_per_model_step"] * 1e9)
        results["sequential_model_examples_per_s"] = args.models * args.batch_size / seq_seconds
        results["ensemble_over_sequential"] = main_row["ensemble_over_sequential"]
        # Against each sequential baseline: "xla" is how one would write the step in Flax
        # without jaxmem; the ensemble's own conv impl isolates what the model axis adds.
        results["ensemble_over_sequential_by_conv_impl"] = {
            impl: s["seconds_per_model_step"] * args.models / (main_row["ms_per_step"] / 1e3)
            for impl, s in singles.items()}
        show(f"sequential single ({results['sequential']['conv_impl']}) x M",
             bench._row(args.models, seq_seconds, single["flops_per_model_step"] * args.models,
                        single["load_avg"]))
    if results.get("pytorch", {}).get("model_examples_per_s"):
        results["over_pytorch"] = (results["model_examples_per_s"]
                                   / results["pytorch"]["model_examples_per_s"])
    save(results, args.json)  # plain vmap below can take many minutes on CPU (grouped convs)
    if "vmap" not in args.skip:
        row = bench.ensemble_step(args.models, bench.spec_with("xla"), "vmap")
        show("plain jax.vmap (xla conv)", row)
        results["vmap_gflops"] = row["gflops"]
        results["vmap_model_examples_per_s"] = row["model_examples_per_s"]
    if "matmul_peak_gflops" in results:
        results["fraction_of_matmul_peak"] = (results["ensemble_gflops"]
                                              / results["matmul_peak_gflops"])
    results["projection"] = projection(args, results["sweep"])
    summary = {k: results.get(k) for k in (
        "model_examples_per_s", "ensemble_over_sequential", "ensemble_gflops",
        "over_pytorch", "sequential_gflops", "vmap_gflops", "matmul_peak_gflops",
        "fraction_of_matmul_peak", "eval_model_examples_per_s")}
    summary["projected_hours"] = results["projection"]["total_hours"]
    print("# " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in summary.items()), flush=True)
    save(results, args.json)
    return 0


def pytorch_baseline(bench: Bench) -> dict:
    """experiments/benchmarks/torch_baseline.py on the benchmark's images, or why it was skipped."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import torch_baseline

    reason = torch_baseline.available()
    if reason is None and bench.jax.default_backend() != "cpu":
        reason = "the PyTorch loop here runs on the CPU only"
    if reason is None and bench.args.arch not in torch_baseline.LAYOUTS:
        reason = f"no PyTorch layout for {bench.args.arch}"
    if reason:
        print(f"# pytorch: skipped ({reason})", flush=True)
        return {"skipped": reason}
    data = bench.dataset
    result = torch_baseline.best_rate(bench.args.arch, data.x_train, data.y_train,
                                      data.num_classes, bench.args.batch_size, bench.args.seconds)
    seconds = bench.args.batch_size / result["model_examples_per_s"]
    print(f"{'pytorch eager, one model (' + result['memory_format'] + ')':<34}{1:>4}"
          f"{1e3 * seconds:>10.1f}{result['model_examples_per_s']:>12.0f}{'':>9}"
          f"{load_average():>6.2f}", flush=True)
    return result


CIFAR10_SIZES = (50_000, 10_000)  # training and test images


def projection(args, sweep: list[dict]) -> dict:
    """Hours for --project K models x E epochs on CIFAR-10 (32x32x3, 10 classes: the shapes
    timed here) at the fastest measured M: each model trains on its own round(0.7 * 50,000)
    examples in whole batches every epoch, and every model is evaluated on all 60,000 images at
    the default Config's evaluated epochs (every 6th and the last)."""
    from jaxmem.config import Config
    from jaxmem.train import orders

    models, epochs = args.project_models, args.project_epochs
    num_train, num_test = CIFAR10_SIZES
    best = max(sweep, key=lambda row: row["model_examples_per_s"])
    per_model_epoch = orders.steps_per_epoch(num_train, 0.7, args.batch_size) * args.batch_size
    train_hours = models * epochs * per_model_epoch / best["model_examples_per_s"] / 3600
    evaluations = len(Config(epochs=epochs).eval_epochs())
    eval_rate = best.get("eval_model_examples_per_s")
    eval_hours = (models * evaluations * (num_train + num_test) / eval_rate / 3600
                  if eval_rate else 0.0)
    result = {"models": models, "epochs": epochs, "at_models_per_wave": best["models"],
              "train_hours": train_hours, "evaluations": evaluations,
              "eval_hours": eval_hours if eval_rate else None,
              "total_hours": train_hours + eval_hours}
    print(f"# projection: {models} {args.arch} x {epochs} epochs on CIFAR-10 at M={best['models']}"
          f": train {train_hours:.2f} h + {evaluations} evaluations "
          + (f"{eval_hours:.2f} h" if eval_rate else "(not measured)")
          + f" = {result['total_hours']:.2f} h", flush=True)
    return result


def save(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
