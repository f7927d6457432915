"""`tiny_cnn`: a CPU-sized convnet for tests and quick runs (any input from 8x8 to 64x64)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jaxmem.models.layers import BatchNorm, Conv, max_pool_2x2


class TinyCNN(nn.Module):
    """conv16-BN-ReLU, conv32-BN-ReLU, maxpool, conv64-BN-ReLU, global average pool, dense."""

    num_classes: int
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    widths: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = x.astype(self.dtype)
        for depth, width in enumerate(self.widths):
            x = Conv(width, impl=self.conv_impl, dtype=self.dtype)(x)
            x = nn.relu(BatchNorm()(x, train, mask))
            if depth == 1 and min(x.shape[1:3]) >= 2:
                x = max_pool_2x2(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
