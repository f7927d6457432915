"""The per-model functions: init, train step, evaluation. Written for ONE model; the ensemble
axis is added by `ensemble.py` (Flax examples: `ensemble_step = jit(vmap(train_step))`).

Each model's batches come from its own subset; the only examples with weight 0 are the padding
of an epoch's last batch, which count neither in the loss nor in the BatchNorm statistics.
Evaluation uses the running BatchNorm statistics (eval mode), so an example's prediction does
not depend on the rest of its evaluation batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxmem import margins
from jaxmem.models.layers import BN_MOMENTUM
from jaxmem.train.augment import augment
from jaxmem.train.optim import STATE_ONLY, Schedule


class ModelState(NamedTuple):
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


class StepTotals(NamedTuple):
    """Sums over an epoch's steps of one model (each [] float32; [M] for an ensemble): the
    weighted loss, the correct predictions and the examples trained on (weight 1)."""

    loss_sum: jax.Array
    correct: jax.Array
    examples: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything static a step closes over (hashable by identity, so jit traces once)."""

    model: nn.Module
    optimizer: Callable[[Schedule], optax.GradientTransformation]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False
    translate: int = 0
    label_smoothing: float = 0.0


def normalize(spec: StepSpec, images):
    """uint8 [B,H,W,Ch] -> float32, standardised per channel."""
    mean, std = jnp.asarray(spec.mean, jnp.float32), jnp.asarray(spec.std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def train_inputs(spec: StepSpec, images, example_ids, key):
    """uint8 [B,H,W,Ch] -> the float32 batch a train step sees: augmented on the raw pixels,
    then normalised, so translation pads with black ((0 - mean) / std per channel)."""
    return normalize(spec, augment(images, example_ids, key, spec.flip, spec.translate))


def init_state(spec: StepSpec, key, image_shape) -> ModelState:
    variables = spec.model.init(key, jnp.zeros((1, *image_shape), jnp.float32), False)
    params = variables["params"]
    return ModelState(params, variables.get("batch_stats", {}),
                      spec.optimizer(STATE_ONLY).init(params))


def weighted_loss(spec: StepSpec, logits, labels, weights):
    """sum(w * l) / max(sum(w), 1): a padding example (w = 0) adds nothing, not even to the
    normaliser, so the loss is the mean over the batch's real examples. Rows of weight 0 are
    selected away (`jnp.where`), never multiplied by 0: an inf or NaN there (a bfloat16
    overflow) changes neither the loss nor any gradient."""
    keep = weights > 0
    logits = jnp.where(keep[:, None], logits, 0.0)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, spec.num_classes), spec.label_smoothing)
    losses = jnp.where(keep, optax.softmax_cross_entropy(logits, targets), 0.0)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def train_step(spec: StepSpec, state: ModelState, images, labels, example_ids, weights, key,
               schedule: Schedule):
    """One SGD step of one model on a batch drawn from its own subset.

    images [B,H,W,Ch] uint8, labels [B], example_ids [B] (dataset indices, for augmentation
    keys), weights [B] float: 1, or 0 for the padding of an epoch's last batch (no loss, no
    BatchNorm statistics), key: this model's augmentation key for the epoch, schedule: the
    learning rate's (the step's position in it is in the optimiser state).
    Returns the new state and this step's StepTotals.
    """
    x = train_inputs(spec, images, example_ids, key)
    bn_mask = weights > 0

    def loss_fn(params):
        logits, updates = spec.model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, True, bn_mask,
            mutable=["batch_stats"])
        return weighted_loss(spec, logits, labels, weights), (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = spec.optimizer(schedule).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    weight_sum = weights.sum()
    correct = jnp.where(weights > 0, (logits.argmax(-1) == labels) * weights, 0.0).sum()
    totals = StepTotals(*(v.astype(jnp.float32) for v in (loss * weight_sum, correct, weight_sum)))
    return ModelState(params, batch_stats, opt_state), totals


def subset_batch_stats(spec: StepSpec, state: ModelState, images, ids, weights):
    """BatchNorm statistics of ONE model recomputed on its own examples: the mean, over batches
    of the model's own subset, of each layer's batch statistics in train mode (no augmentation,
    no gradient), weighted by the batch's examples. images [N, H, W, Ch] uint8 (the dataset;
    each batch is gathered in turn), ids [S, B] (S batches of example ids), weights [S, B] 0/1
    (0: padding). Returns batch_stats like state.batch_stats.

    Running averages (momentum BN_MOMENTUM) lag early in training: after 14 steps 23% of them
    are still the initial values, which biases evaluation at early epochs. Each layer's batch
    statistics are read as the running update from zero: (1 - m) * batch."""
    zero = jax.tree.map(jnp.zeros_like, state.batch_stats)

    def one_batch(total, batch):
        batch_ids, w = batch
        _, updates = spec.model.apply({"params": state.params, "batch_stats": zero},
                                      normalize(spec, images[batch_ids]), True, w > 0,
                                      mutable=["batch_stats"])
        stats = jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), updates["batch_stats"])
        return jax.tree.map(lambda t, s: t + w.sum() * s, total, stats), None

    total, _ = jax.lax.scan(one_batch, zero, (ids, weights))
    return jax.tree.map(lambda t: t / jnp.maximum(weights.sum(), 1.0), total)


def eval_logits(spec: StepSpec, state: ModelState, images):
    """[B, C] eval-mode logits. Eval mode: BatchNorm uses its running statistics (and leaves
    them unchanged), so each image's result is independent of the others in the batch; no
    augmentation."""
    return spec.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            normalize(spec, images), False)


def eval_margins(spec: StepSpec, state: ModelState, images, labels):
    """Eval mode: ([B] bool correctness, [B] int16 true-class margin), what every evaluation
    records. The predicted class is the logits' argmax (the lowest class among equal logits),
    so correctness is `predicted == labels`; the margin is the true-class logit minus the
    largest other one, in jaxmem/margins.py's fixed point, whose sign is that correctness."""
    correct, _, _, units = eval_predictions(spec, state, images, labels, probabilities=False)
    return correct, units


def eval_predictions(spec: StepSpec, state: ModelState, images, labels,
                     probabilities: bool = True):
    """Eval mode, from one forward pass: ([B] bool correctness, [B] int32 predicted class,
    [B, C] float32 softmax probabilities (None without `probabilities`), [B] int16 true-class
    margin; see `eval_margins`). The last evaluation's held-out predictions need the classes and
    probabilities; the others only correctness and margins."""
    logits = eval_logits(spec, state, images).astype(jnp.float32)
    predicted = logits.argmax(-1).astype(jnp.int32)
    correct = predicted == labels
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    other = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf,
                      logits).max(-1)
    return (correct, predicted, jax.nn.softmax(logits, axis=-1) if probabilities else None,
            margins.quantize(true - other, correct, jnp))
