"""VGG family: blocks of conv3x3-BN-ReLU with 2x2 max-pools ('M'), then a global max-pool and FC.

A 'M' halves the spatial size only while it is above 1x1, so every layout builds for inputs from
8x8 to 64x64; the final global max-pool makes the classifier (last width) x C whatever the input
size. Convolutions have no bias (BatchNorm follows each one).

Layouts (numbers are conv3x3 widths, M a 2x2 max-pool, then global max-pool and one FC). The
paper's appendix shows only the ends of each layout; the middles are filled so that the counts
match its table. Trainable parameters (convs + BN scale/bias + FC) at 32x32x3 / 10 classes,
32x32x3 / 100 classes, 64x64x3 / 200 classes:

  small_vgg  64 M 64 64 M 64 64 64 M 512 M                                 0.49M / 0.53M / 0.59M
  med_vgg    64 M 128 128 M 128 M 512 M                                     0.97M / 1.01M / 1.06M
  large_vgg  64 M 512 512 M 512 M 512 M                                     7.38M / 7.43M / 7.48M
  vgg19      64 64 M 128 128 M 256x4 M 512x4 M 512x4 M (CIFAR VGG19-BN)   20.04M / 20.08M / 20.13M

med_vgg and large_vgg share one skeleton (a 64-wide stem, a pool, two convs, a pool, one conv, a
pool, a 512-wide conv) and differ only in the middle widths (128 vs 512): 1M vs 7.5M in the paper.
vgg19 is the usual CIFAR VGG19 with BatchNorm and a single 512 x C classifier.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jaxmem.models.layers import BatchNorm, Conv, max_pool_2x2

LAYOUTS: dict[str, tuple[int | str, ...]] = {
    # The paper: "64 -> MaxPool -> 64 -> MaxPool -> ... -> 512 -> MaxPool -> FC", ~0.5M params.
    "small_vgg": (64, "M", 64, 64, "M", 64, 64, 64, "M", 512, "M"),
    # The paper: "64 -> MaxPool -> 128 -> 128 -> ... -> 512 -> MaxPool -> FC", ~1M params.
    "med_vgg": (64, "M", 128, 128, "M", 128, "M", 512, "M"),
    # The paper: "64 -> MaxPool -> 512 -> 512 -> ... -> 512 -> MaxPool -> FC", ~7.5M params.
    "large_vgg": (64, "M", 512, 512, "M", 512, "M", 512, "M"),
    # CIFAR VGG19 with BatchNorm (configuration "E" of Simonyan & Zisserman), ~20M params.
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
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
                    x = max_pool_2x2(x)
                continue
            x = Conv(item, impl=self.conv_impl, dtype=self.dtype)(x)
            x = nn.relu(BatchNorm()(x, train, mask))
        x = x.max(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
