"""SGD with momentum, weight decay and the triangular learning-rate schedule of the paper."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxmem.config import Config


def triangular_schedule(peak: float, total_steps: int, peak_fraction: float):
    """Linear rise from ~0 to `peak` over peak_fraction of training, then linear decay to ~0."""
    peak_step = peak_fraction * total_steps
    return lambda step: jnp.interp(step + 1.0, jnp.array([0.0, peak_step, total_steps + 1.0]),
                                   jnp.array([0.0, peak, 0.0]))


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = triangular_schedule(config.lr, config.epochs * steps_per_epoch,
                                   config.lr_peak_fraction)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.momentum > 0),
    )
