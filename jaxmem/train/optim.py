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

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax

from jaxmem.config import Config


class Schedule(NamedTuple):
    """The triangular schedule's numbers (each [] float32). The train step takes them as
    arguments, not as constants of its compiled program, so one program serves every length
    and peak of one model and batch: the pilot's lengths and runs of other epochs or lr reuse
    it (from a persistent compilation cache, where one is set)."""

    peak: np.ndarray
    peak_step: np.ndarray
    total_steps: np.ndarray

    @classmethod
    def triangular(cls, peak: float, total_steps: int, peak_fraction: float) -> Schedule:
        return cls(*np.float32([peak, peak_fraction * total_steps, total_steps]))


# Any Schedule gives the optimiser state the same structure: what `init` builds it with.
STATE_ONLY = Schedule.triangular(0.0, 1, 0.5)


def schedule_for(config: Config, steps_per_epoch: int) -> Schedule:
    """The schedule spans epochs * steps_per_epoch steps."""
    return Schedule.triangular(config.lr, config.epochs * steps_per_epoch,
                               config.lr_peak_fraction)


def triangular_schedule(schedule: Schedule):
    """Linear rise from ~0 to `peak` over peak_fraction of training, then linear decay to ~0.

    With T = total_steps and P = peak_fraction * T, step s (0-based) gets
    peak * (s + 1) / P while s + 1 <= P, else peak * (T + 1 - (s + 1)) / (T + 1 - P): the
    line through 0 before the first step, `peak` at step P - 1 (when P is whole) and 0 one step
    after the last.
    """
    peak, peak_step, total = schedule
    return lambda step: jnp.interp(step + 1.0, jnp.stack([0.0, peak_step, total + 1.0]),
                                   jnp.stack([0.0, peak, 0.0]))


def make_optimizer(config: Config, schedule: Schedule) -> optax.GradientTransformation:
    """Decay is coupled (g + wd * w goes through the momentum), not AdamW-style decoupled."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),  # wd: the paper's; coupled: ours
        # momentum: the paper's; Nesterov: ours (momentum 0 = plain SGD)
        optax.sgd(triangular_schedule(schedule), momentum=config.momentum or None,
                  nesterov=config.momentum > 0),
    )
