"""VGG family: blocks of conv3x3-BN-ReLU with 2x2 max-pools ('M'), then a global max-pool and FC.

A 'M' halves the spatial size only while it is above 1x1, so every layout builds for inputs from
8x8 to 64x64; the final global max-pool makes the classifier 512 x C whatever the input size.
Parameter counts for 32x32x3 inputs and 10 classes are listed by `run.py --list-archs`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jaxmem.models.layers import BatchNorm, Conv

LAYOUTS: dict[str, tuple[int | str, ...]] = {
    # The paper: "64 -> MaxPool -> 64 -> MaxPool -> ... -> 512 -> MaxPool -> FC", ~0.5M params.
    "small_vgg": (64, "M", 64, 64, "M", 64, 64, 64, "M", 512, "M"),
}


class VGG(nn.Module):
    num_classes: int
    layout: tuple[int | str, ...]
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = x.astype(self.dtype)
        for item in self.layout:
            if item == "M":
                if min(x.shape[1:3]) >= 2:
                    x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = Conv(item, impl=self.conv_impl, dtype=self.dtype)(x)
            x = nn.relu(BatchNorm()(x, train, mask))
        x = x.max(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
