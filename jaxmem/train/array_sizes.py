"""The largest array a wave's programs hold on one device, and the most models per device that
keep it within what the backend's kernels can index.

GPU kernels index an array's elements with 32-bit integers in many places (XLA's, cuDNN's
and others' alike fail above 2^31 elements with CUDA_ERROR_ILLEGAL_ADDRESS, which kills the
process). Measured on an H200: a vmapped small_vgg step at batch 512 ran with 64 models
(first activations of 64 x 512 x 32 x 32 x 64 = 2^31 elements) and failed with 256. Memory
alone would plan far larger waves there (BENCHMARKS.md), so on GPU the wave is also capped by
its largest array.

Sizes come from the programs' jaxprs traced for ONE model (no compile): every intermediate of
the training step (forward and backward), of the evaluation and of the BatchNorm
recalibration. Under vmap every such array gains the model axis, so m models per device hold
m times the largest; lax.map runs one model (vmap:C one chunk of C) at a time, and only the
arrays stacked over the models (states, example orders) grow with m.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxmem.errors import UserError
from jaxmem.train import step as step_lib
from jaxmem.train.ensemble import parse_strategy

# backend -> most elements one array may hold on one device (no entry: no limit known)
ELEMENT_LIMIT = {"gpu": 2**31}


@dataclasses.dataclass(frozen=True)
class PerModel:
    """Element counts for one model: the largest intermediate of its training step (`train`)
    and of its forward-only passes (`forward`: evaluation, recalibration), and its largest
    row of the arrays stacked over a wave's models (`row`: a parameter or optimiser leaf, its
    example order)."""

    train: int
    forward: int
    row: int


def largest_in(closed_jaxpr) -> int:
    """Elements of the largest array any equation of a jaxpr (or of the jaxprs inside it:
    loops, conditionals, custom derivatives, nested jits) computes."""
    return _largest(closed_jaxpr.jaxpr)


def _largest(jaxpr) -> int:
    most = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", None)
            if shape is not None:
                most = max(most, math.prod(shape))
        for param in eqn.params.values():
            for inner in _inner_jaxprs(param):
                most = max(most, _largest(inner))
    return most


def _inner_jaxprs(param):
    if hasattr(param, "eqns"):  # a Jaxpr
        yield param
    elif hasattr(getattr(param, "jaxpr", None), "eqns"):  # a ClosedJaxpr
        yield param.jaxpr
    elif isinstance(param, (tuple, list)):
        for item in param:
            yield from _inner_jaxprs(item)


def per_model(ensemble, images, labels, steps: int, eval_batch: int, schedule) -> PerModel:
    """The element counts of one model of `ensemble` (an Ensemble) training `steps` steps per
    epoch on the on-device `images`, `labels`, evaluated in batches of `eval_batch`."""
    one = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    keys = one((1, 2), jnp.uint32)
    states = jax.eval_shape(ensemble._init, keys)
    orders = one((1, steps * ensemble.batch_size), jnp.int32)
    totals = step_lib.StepTotals(*[one((1,), jnp.float32)] * 3)
    step = one((), jnp.int32)
    ids = one((eval_batch,), jnp.int32)
    train = largest_in(jax.make_jaxpr(ensemble._train_step)(
        states, totals, orders, keys, images, labels, step, schedule))
    forward = max(
        largest_in(jax.make_jaxpr(ensemble._evaluate)(states, images, labels, ids)),
        largest_in(jax.make_jaxpr(ensemble._recalibrate)(states, orders, images, labels)))
    row = max(math.prod(leaf.shape) for leaf in jax.tree.leaves((states, orders)))
    return PerModel(train, forward, row)


def largest_array(sizes: PerModel, models: int, strategy: str, eval_strategy: str) -> int:
    """Elements of the largest array of a wave with `models` models on one device."""
    return max(_together(strategy, models) * sizes.train,
               _together(eval_strategy, models) * sizes.forward, models * sizes.row)


def _together(strategy: str, models: int) -> int:
    """How many of `models` models one program step computes at once under `strategy`."""
    name, chunk = parse_strategy(strategy)
    if name != "vmap":
        return 1
    return models if chunk is None else min(chunk, models)


def most_models_per_device(sizes: PerModel, strategy: str, eval_strategy: str,
                           limit: int) -> int:
    """The most models one device may hold with no array above `limit` elements (a
    UserError where a single model's programs already exceed it)."""
    largest = lambda m: largest_array(sizes, m, strategy, eval_strategy)  # noqa: E731
    if largest(1) > limit:
        raise UserError(
            f"one model's step computes an array of {largest(1):,} elements, above the "
            f"{limit:,} that this backend's kernels can index; lower --batch-size or "
            "--eval-batch-size")
    low, high = 1, max(1, limit // sizes.row)  # largest(m) <= limit holds at low
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if largest(middle) <= limit else (low, middle - 1)
    return low
