"""The forward-only passes of a run (BatchNorm recalibration on each model's own subset, then
every model on every training and test example) under each lowering and evaluation batch.

    python experiments/benchmarks/eval_lowerings.py          # the default run's models
    python experiments/benchmarks/eval_lowerings.py --arch=small_vgg --dataset=synthetic \\
        --num-models=8

Settings not given come from the dataset's recipe, as in a run. Each candidate
(conv impl x ensemble strategy x batch) is compiled, then one evaluation as the trainer runs it
is timed --repeats times (the fastest is kept); the table shows model-examples per second of
the evaluation (training + test examples) and the seconds of one evaluation. The winner per
backend belongs in jaxmem.train.lowering.EVAL_BEST.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import jax
import numpy as np

from jaxmem import data, keys, recipes
from jaxmem.masks import run_masks
from jaxmem.train import lowering
from jaxmem.train.loop import Trainer
from jaxmem.train.orders import model_orders


def time_candidate(config, dataset, masks, repeats: int) -> tuple[float, float]:
    """(compile seconds, fastest seconds of one evaluation) of config's forward passes."""
    trainer = Trainer(config, dataset)
    count = len(masks)
    indices = np.arange(count)
    ensemble = trainer.ensemble
    states = ensemble.init(jax.device_put(
        jax.random.key_data(keys.model_keys(config.seed, keys.INIT, indices)),
        ensemble.model_sharding))
    orders = jax.device_put(model_orders(config.seed, indices, masks, 0, trainer.steps,
                                         config.batch_size), ensemble.model_sharding)
    result = trainer.empty_wave(count)
    result["eval_seconds"] = 0.0
    tic = time.perf_counter()
    trainer._evaluate(states, orders, 0, result)  # compiles
    compile_s = time.perf_counter() - tic
    times = []
    for _ in range(repeats):
        result["eval_seconds"] = 0.0
        trainer._evaluate(states, orders, 0, result)
        times.append(result["eval_seconds"])
    return compile_s, min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--num-models", type=int, default=32)
    parser.add_argument("--conv-impls", default="xla,im2col")
    parser.add_argument("--strategies", default="vmap,map,vmap:8")
    parser.add_argument("--batches", default="128,256,1024")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    lowering.reexec_with_process_env()
    config, _ = recipes.resolve({"arch": args.arch, "dataset": args.dataset,
                                 "num_models": args.num_models})
    dataset = data.load(config.dataset)
    masks = run_masks(config, dataset.num_train)
    examples = args.num_models * (dataset.num_train + dataset.num_test)
    print(f"# {args.arch} on {args.dataset}: {args.num_models} models x "
          f"{dataset.num_train} + {dataset.num_test} examples on {jax.default_backend()}, "
          f"recalibration batch {config.batch_size}; EVAL_BEST now "
          f"{lowering.EVAL_BEST.get(jax.default_backend())}", flush=True)
    print(f"{'conv':<8}{'ensemble':<10}{'batch':>6}{'compile s':>11}{'eval s':>9}"
          f"{'model-ex/s':>12}", flush=True)
    for conv, strategy, batch in itertools.product(
            args.conv_impls.split(","), args.strategies.split(","),
            [int(b) for b in args.batches.split(",")]):
        candidate = dataclasses.replace(config, conv_impl=conv, ensemble=strategy,
                                        eval_batch_size=batch)
        compile_s, seconds = time_candidate(candidate, dataset, masks, args.repeats)
        print(f"{conv:<8}{strategy:<10}{batch:>6}{compile_s:>11.1f}{seconds:>9.2f}"
              f"{examples / seconds:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
