"""The ensemble form of the per-model step: mapped over a leading model axis (vmapped by
default; `map_models`), sharded over devices on that axis with `jax.shard_map` (jit with a
NamedSharding on the model axis would all-gather the weights, openxla/xla#47945), jitted once.

Every function here takes the whole on-device dataset and gathers the batch itself, so a step
moves no image data between host and device: the host sends only the step number.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmem.train import step as step_lib

AXIS = "models"
# The accepted values of `strategy`; "vmap:C" stands for "vmap:1", "vmap:2", ...
STRATEGIES = ("vmap", "vmap:C", "map", "unroll")


def make_mesh(devices=None) -> Mesh:
    """A 1-d mesh over this process's devices (default: all local devices)."""
    return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), (AXIS,))


def parse_strategy(strategy: str) -> tuple[str, int | None] | None:
    """"vmap" -> ("vmap", None), "vmap:8" -> ("vmap", 8), "map"/"unroll" -> (name, None);
    None for anything else (the caller words the error: a CLI flag or a ValueError)."""
    if strategy in ("vmap", "map", "unroll"):
        return strategy, None
    chunked = re.fullmatch(r"vmap:([1-9][0-9]*)", strategy)
    return ("vmap", int(chunked.group(1))) if chunked else None


# backend -> XLA options of the programs that run once per wave and cost nothing to run
# (initialising the models): on CPU, LLVM's optimisation of the initialisers' random numbers
# made up most of a small run's start (compile times at both levels: BENCHMARKS.md). The
# initial weights differ from the default level's by float32 rounding (1 ulp), and every
# wave, resume and part compiles them alike.
ONCE_PER_WAVE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def map_models(fn, strategy: str, in_axes):
    """fn over ONE model -> fn over a leading model axis (in_axes: 0 = mapped, None = shared).

    "vmap": one batched program (convs become grouped convs or batched matmuls, see layers.py).
    "map": `jax.lax.map`, a loop over the models inside the one program: one model's
    activations live at a time (small memory) and convs stay plain convs, but the models run
    one after another.
    "vmap:C": `jax.lax.map(..., batch_size=C)`, a loop over chunks of C models, each chunk
    vmapped: between the two (memory and batching grow with C). Any number of models works: a
    remainder of M mod C models (M per device) is one more vmapped program after the loop, and
    C >= M is plain "vmap".
    "unroll": the per-model programs written out one after another inside the same jit, which XLA
    may schedule in parallel; compile time grows with the number of models per device.
    All four compute the same numbers up to float rounding (tests/test_ensemble.py).
    """
    parsed = parse_strategy(strategy)
    if parsed is None:
        raise ValueError(f"unknown ensemble strategy {strategy!r}; choose one of {STRATEGIES}")
    name, chunk = parsed
    if name == "vmap" and chunk is None:
        return jax.vmap(fn, in_axes=in_axes)

    def mapped_of(args):
        return [a for a, axis in zip(args, in_axes, strict=True) if axis == 0]

    def call(args, picked):
        """fn on args with the mapped ones replaced, in order, by one model's picks."""
        picked = iter(picked)
        return fn(*[next(picked) if axis == 0 else a
                    for a, axis in zip(args, in_axes, strict=True)])

    if name in ("map", "vmap"):
        def looped(*args):
            return jax.lax.map(lambda picked: call(args, picked), mapped_of(args),
                               batch_size=chunk)

        return looped

    def unrolled(*args):
        mapped = mapped_of(args)
        count = jax.tree.leaves(mapped)[0].shape[0]
        outputs = [call(args, [jax.tree.map(lambda leaf, k=k: leaf[k], a) for a in mapped])
                   for k in range(count)]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)

    return unrolled


class Ensemble:
    """Jitted ensemble functions for one StepSpec on one mesh.

    states carry a leading model axis M (a multiple of the mesh size), sharded on it. Keys
    cross the shard_map boundary as raw uint32 data [M, 2] (`jax.random.key_data`).

    The forward-only passes (evaluate, recalibrate) may use their own lowering: eval_spec
    (the same model and parameters with another conv_impl) and eval_strategy; by default the
    training step's.
    """

    def __init__(self, spec: step_lib.StepSpec, image_shape, batch_size: int,
                 mesh: Mesh | None = None, strategy: str = "vmap",
                 eval_spec: step_lib.StepSpec | None = None, eval_strategy: str | None = None):
        self.spec, self.image_shape, self.batch_size = spec, tuple(image_shape), batch_size
        self.mesh = mesh if mesh is not None else make_mesh()
        self.strategy = strategy
        self.eval_spec = eval_spec if eval_spec is not None else spec
        self.eval_strategy = eval_strategy or strategy
        self.model_sharding = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.init = jax.jit(self._sharded(self._init, (P(AXIS),), P(AXIS)),
                            compiler_options=ONCE_PER_WAVE_OPTIONS.get(
                                self.mesh.devices.flat[0].platform))
        self.train_step = jax.jit(
            self._sharded(self._train_step, (P(AXIS),) * 4 + (P(),) * 4,
                          (P(AXIS), P(AXIS))),
            donate_argnums=(0,))
        self.evaluate = jax.jit(
            self._sharded(self._evaluate, (P(AXIS), P(), P(), P()), P(AXIS)))
        self.evaluate_margins = jax.jit(
            self._sharded(self._evaluate_margins, (P(AXIS), P(), P(), P()), P(AXIS)))
        self.recalibrate = jax.jit(
            self._sharded(self._recalibrate, (P(AXIS), P(AXIS), P(), P()), P(AXIS)))

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _sharded(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def zero_totals(self, count: int) -> step_lib.StepTotals:
        """StepTotals of `count` models, all zero, on their models' devices."""
        zeros = jax.device_put(jnp.zeros(count, jnp.float32), self.model_sharding)
        return step_lib.StepTotals(zeros, zeros, zeros)

    def _init(self, init_keys):
        def one(key_data):
            return step_lib.init_state(self.spec, jax.random.wrap_key_data(key_data),
                                       self.image_shape)

        return map_models(one, self.strategy, (0,))(init_keys)

    def _train_step(self, states, totals, orders, aug_keys, images, labels, step, schedule):
        """states [M..], totals (StepTotals of [M]), orders [M, S*B] (each model's own example
        order for the epoch, N marks padding), aug_keys [M] (this epoch's), images [N,H,W,Ch] uint8,
        labels [N], step [] (within the epoch), schedule (optim.Schedule, the same for all).

        Each model gathers its own batch from its own subset, so no compute is spent on
        held-out examples (with one shared batch and 0/1 masks, a share 1 - r of it was: 30% at
        r = 0.7). Only padding in an epoch's last batch gets weight 0."""
        num_examples = labels.shape[0]

        def one(state, order, key_data):
            ids = jax.lax.dynamic_slice(order, (step * self.batch_size,), (self.batch_size,))
            weights = (ids < num_examples).astype(jnp.float32)
            ids = jnp.minimum(ids, num_examples - 1)
            return step_lib.train_step(self.spec, state, images[ids], labels[ids], ids,
                                       weights, jax.random.wrap_key_data(key_data), schedule)

        states, stats = map_models(one, self.strategy, (0, 0, 0))(states, orders, aug_keys)
        return states, jax.tree.map(jnp.add, totals, stats)

    def _recalibrate(self, states, orders, images, labels):
        """states with every model's BatchNorm statistics recomputed on its own subset (the
        examples of its order [M, S*B] for an epoch; N marks padding): for evaluation."""
        num_examples = labels.shape[0]

        def one(state, order):
            ids = order.reshape(-1, self.batch_size)  # [S, B]
            weights = (ids < num_examples).astype(jnp.float32)
            stats = step_lib.subset_batch_stats(self.eval_spec, state, images,
                                                jnp.minimum(ids, num_examples - 1), weights)
            return state._replace(batch_stats=stats)

        return map_models(one, self.eval_strategy, (0, 0))(states, orders)

    def _evaluate(self, states, images, labels, ids, eval_fn=step_lib.eval_predictions):
        """Every model on images[ids] (ids clipped to the dataset): [M, B] bool correctness,
        [M, B] int32 predicted class, [M, B, C] float32 softmax probabilities, [M, B] int16
        true-class margins (jaxmem/margins.py); eval_fn=step_lib.eval_margins: only the first
        and the last of them."""
        ids = jnp.minimum(ids, labels.shape[0] - 1)
        batch_images, batch_labels = images[ids], labels[ids]

        def one(state):
            return eval_fn(self.eval_spec, state, batch_images, batch_labels)

        return map_models(one, self.eval_strategy, (0,))(states)

    def _evaluate_margins(self, states, images, labels, ids):
        return self._evaluate(states, images, labels, ids, step_lib.eval_margins)

    def predict_on(self, states, images, labels, eval_batch_size: int,
                   predictions=None) -> tuple[np.ndarray, np.ndarray]:
        """([M, N] bool correctness, [M, N] int16 true-class margins) on a whole on-device
        split, in fixed-size chunks (one trace). predictions: called per chunk as
        predictions(start, predicted [M, b], probs [M, b, C]) for its b examples
        start..start+b; only then are classes and probabilities computed (`evaluate`, else
        `evaluate_margins`) and copied to the host."""
        num = labels.shape[0]
        chunks = []
        for start in range(0, num, eval_batch_size):
            ids = jnp.arange(start, start + eval_batch_size, dtype=jnp.int32)
            if predictions is None:
                chunks.append(self.evaluate_margins(states, images, labels, ids))
                continue
            correct, predicted, probs, units = self.evaluate(states, images, labels, ids)
            chunks.append((correct, units))
            real = min(eval_batch_size, num - start)
            predictions(start, np.asarray(predicted)[:, :real], np.asarray(probs)[:, :real])
        return tuple(np.concatenate([np.asarray(c[j]) for c in chunks], axis=1)[:, :num]
                     for j in range(2))
