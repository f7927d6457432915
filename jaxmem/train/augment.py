"""On-device augmentation: random horizontal flip and translation, per model and per example.

The randomness of example i for model k in epoch e comes from fold_in(key(seed, k, e), i), so it
is independent of the batch composition: training on the full batch with a mask and on the
physically subsetted batch see identical augmented images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(images, example_ids, key, flip: bool, translate: int):
    """images [B,H,W,Ch] float, example_ids [B] int, key: this model's epoch key -> [B,H,W,Ch]."""
    if not flip and translate == 0:
        return images
    height, width = images.shape[1:3]

    def one(image, example_id):
        flip_key, shift_key = jax.random.split(jax.random.fold_in(key, example_id))
        if translate:
            padded = jnp.pad(image, ((translate, translate), (translate, translate), (0, 0)))
            dy, dx = jax.random.randint(shift_key, (2,), 0, 2 * translate + 1)
            image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[-1]))
        if flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image

    return jax.vmap(one)(images, example_ids)
