"""Subset masks: model k trains on exactly round(r*N) examples drawn from (seed, k)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import keys


def subset_size(num_examples: int, ratio: float) -> int:
    return int(round(ratio * num_examples))


def subset_masks(seed: int, model_indices, num_examples: int, ratio: float) -> np.ndarray:
    """[M, N] bool; row k depends only on (seed, model_indices[k], N, ratio)."""
    model_keys = keys.model_keys(seed, keys.MASKS, np.asarray(model_indices, np.int64))
    return np.asarray(_draw(model_keys, num_examples, subset_size(num_examples, ratio)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(model_keys, num_examples: int, size: int):
    def one(key):
        chosen = jax.random.permutation(key, num_examples)[:size]
        return jnp.zeros(num_examples, bool).at[chosen].set(True)

    return jax.vmap(one)(model_keys)


def run_masks(config, num_examples: int) -> np.ndarray:
    """[K, N] masks of the models `config.model_indices()` of a run (a `Config`): the one place
    a run draws its subsets."""
    return subset_masks(config.seed, config.model_indices(), num_examples, config.subset_ratio)
