"""Batch orders: each model's epoch is its own subset, shuffled from (seed, model, epoch) alone,
cut into whole batches of example ids (padding marked by N)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import keys
from jaxmem.masks import subset_size


def steps_per_epoch(num_examples: int, subset_ratio: float, batch_size: int) -> int:
    """Every model's epoch is its own subset: round(r*N) examples in whole batches."""
    return math.ceil(subset_size(num_examples, subset_ratio) / batch_size)


def model_orders(seed: int, model_indices, masks, epoch: int, steps: int, batch_size: int,
                 sharding=None):
    """[M, steps*B] int32: each model's example order for an epoch, its own subset (mask row)
    shuffled by a key from (seed, model index, epoch) alone, padded with N (= no example) to
    whole batches. Every row of masks holds the same number of examples (masks.py).
    With `sharding` (the model axis over the devices) each device draws its own models' orders
    and the result stays there, instead of one device drawing all of them."""
    size = int(masks[0].sum())
    order_keys = keys.model_keys(seed, keys.ORDER, np.asarray(model_indices))
    masks = jnp.asarray(masks)
    if sharding is not None:
        order_keys, masks = jax.device_put((order_keys, masks), sharding)
    return _orders(order_keys, masks, epoch, size, steps * batch_size)


@functools.partial(jax.jit, static_argnames=("size", "length"))
def _orders(order_keys, masks, epoch, size: int, length: int):
    def one(key, mask):
        members = jnp.nonzero(mask, size=size)[0].astype(jnp.int32)
        shuffled = jax.random.permutation(jax.random.fold_in(key, epoch), members)
        return jnp.pad(shuffled, (0, length - size), constant_values=mask.shape[0])

    return jax.vmap(one)(order_keys, masks)
