"""SGD with momentum, weight decay and the triangular learning-rate schedule of the paper.

Where each setting comes from ("the paper": "Back to fundamentals: re-examining memorization in
deep learning models"):
- the paper: SGD with momentum; weight decay 5e-4; a triangular (one-cycle) schedule peaking at
  lr 0.4; batch 512 for 100 epochs (batch and epochs are `Config` settings, see config.py).
- our choices: Nesterov momentum, mu = 0.9 (the usual value); the decay coupled (wd * w added
  to the gradient before the momentum, as torch.optim.SGD's weight_decay does); the peak after
  `lr_peak_fraction` = 0.25 of training; the schedule indexed so that neither the first nor the
  last step has lr 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxmem.config import Config


def triangular_schedule(peak: float, total_steps: int, peak_fraction: float):
    """Linear rise from ~0 to `peak` over peak_fraction of training, then linear decay to ~0.

    With T = total_steps and P = peak_fraction * T, step s (0-based) gets
    peak * (s + 1) / P while s + 1 <= P, else peak * (T + 1 - (s + 1)) / (T + 1 - P): the
    line through 0 before the first step, `peak` at step P - 1 (when P is whole) and 0 one step
    after the last.
    """
    peak_step = peak_fraction * total_steps
    return lambda step: jnp.interp(step + 1.0, jnp.array([0.0, peak_step, total_steps + 1.0]),
                                   jnp.array([0.0, peak, 0.0]))


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The schedule spans epochs * steps_per_epoch steps; decay is coupled (g + wd * w goes
    through the momentum), not AdamW-style decoupled."""
    schedule = triangular_schedule(config.lr, config.epochs * steps_per_epoch,
                                   config.lr_peak_fraction)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),  # wd: the paper's; coupled: ours
        # momentum: the paper's; Nesterov: ours (momentum 0 = plain SGD)
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.momentum > 0),
    )
