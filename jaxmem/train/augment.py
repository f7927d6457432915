"""On-device augmentation: random horizontal flip and translation, per model and per example.

It runs on the raw images, before normalisation, so a translation pads with black (pixel 0), as
the paper's pipeline does (torchvision-style RandomCrop with zero padding on the raw image), not
with the dataset's mean colour (what padding the normalised image with 0 would give).

Recipe ("the paper": "Back to fundamentals: re-examining memorization in deep learning models"):
a random horizontal flip and a random translation by up to 4 px of the 32x32 images are the
paper's; the translation of other image sizes (1 px at 8x8, 8 px at 64x64: the same 1/8 of the
side) is our choice; each dataset sets its default (`Dataset.flip`, `Dataset.translate`).

The randomness of example i for model k in epoch e comes from fold_in(key(seed, k, e), i) alone,
not from the batch: whether model k draws its batches from its own subset inside the ensemble
or is trained alone on the physically subsetted data, and wherever i sits in a batch (next to
other examples or to the weight-0 padding of an epoch's last batch), it sees the same image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(images, example_ids, key, flip: bool, translate: int):
    """images [B,H,W,Ch] raw pixels (any dtype; 0 is black), example_ids [B] int, key: this
    model's epoch key -> [B,H,W,Ch], same dtype. Shifts by (dy, dx), each uniform in
    [-translate, translate], filling with 0, then mirrors left-right with probability 1/2."""
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
