"""Explicit randomness: every key derives from (seed, purpose, model index[, epoch]) alone.

So model k gets the same subset, init, augmentation and batch order whether it is trained in a
wave of 1, of 64, on one device or on four (docs/design.md, property 2).
"""

from __future__ import annotations

import jax

MASKS, INIT, AUGMENT, ORDER, CANARIES = 0, 1, 2, 3, 4


def purpose_key(seed: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), purpose)


def model_keys(seed: int, purpose: int, model_indices) -> jax.Array:
    """[M] keys, one per model index, for one purpose."""
    base = purpose_key(seed, purpose)
    return jax.vmap(lambda k: jax.random.fold_in(base, k))(jax.numpy.asarray(model_indices))
