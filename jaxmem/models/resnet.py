"""ResNets with the CIFAR stem (He et al. 2016; the usual CIFAR adaptation of torchvision's).

Stem: conv3x3(64)-BN-ReLU at full resolution, no stem max-pool (32x32 inputs would otherwise be
8x8 before the first stage). Four stages of widths 64, 128, 256, 512 with strides 1, 2, 2, 2
(the first block of a stage carries the stride), global average pool, one FC. Every BatchNorm is
the masked one (layers.BatchNorm), every conv is layers.Conv ('SAME' padding, no bias).

  resnet18  BasicBlock (conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU), blocks (2, 2, 2, 2)
  resnet50  Bottleneck (conv1x1-BN-ReLU, conv3x3/stride-BN-ReLU, conv1x1(4x)-BN, + shortcut,
            ReLU; the stride on the 3x3 conv, "ResNet v1.5"), blocks (3, 4, 6, 3)

The shortcut is the identity, or conv1x1/stride-BN where the stride or the width changes.
Trainable parameters at 32x32x3 / 10 classes, 32x32x3 / 100 classes, 64x64x3 / 200 classes:
resnet18 11.17M / 11.22M / 11.27M; resnet50 23.52M / 23.71M / 23.91M (only the classifier
depends on the number of classes; nothing depends on the input size). A 'SAME' stride-2 conv
of a 1x1 map stays 1x1, so any input from 8x8 up builds (8x8 reaches 1x1 in the last stage).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jaxmem.models.layers import BatchNorm, Conv

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """x [B,H,W,Ci] -> [B,H/s,W/s,width]."""

    width: int
    strides: int
    conv_impl: str
    dtype: jnp.dtype

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool, mask):
        conv = dict(impl=self.conv_impl, dtype=self.dtype)
        y = Conv(self.width, 3, self.strides, **conv)(x)
        y = nn.relu(BatchNorm()(y, train, mask))
        y = Conv(self.width, 3, 1, **conv)(y)
        y = BatchNorm()(y, train, mask)
        return nn.relu(y + _shortcut(x, self.width, self.strides, train, mask, conv))


class Bottleneck(nn.Module):
    """x [B,H,W,Ci] -> [B,H/s,W/s,4*width]."""

    width: int
    strides: int
    conv_impl: str
    dtype: jnp.dtype

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool, mask):
        conv = dict(impl=self.conv_impl, dtype=self.dtype)
        out = self.width * self.expansion
        y = Conv(self.width, 1, 1, **conv)(x)
        y = nn.relu(BatchNorm()(y, train, mask))
        y = Conv(self.width, 3, self.strides, **conv)(y)
        y = nn.relu(BatchNorm()(y, train, mask))
        y = Conv(out, 1, 1, **conv)(y)
        y = BatchNorm()(y, train, mask)
        return nn.relu(y + _shortcut(x, out, self.strides, train, mask, conv))


def _shortcut(x, features: int, strides: int, train: bool, mask, conv: dict):
    """Identity when shapes agree, else conv1x1/stride-BN (created in the calling block's scope)."""
    if strides == 1 and x.shape[-1] == features:
        return x
    x = Conv(features, 1, strides, name="shortcut_conv", **conv)(x)
    return BatchNorm(name="shortcut_bn")(x, train, mask)


class ResNet(nn.Module):
    num_classes: int
    stage_sizes: tuple[int, ...]
    block: type[nn.Module]
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = x.astype(self.dtype)
        x = Conv(STAGE_WIDTHS[0], 3, 1, impl=self.conv_impl, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(BatchNorm(name="stem_bn")(x, train, mask))
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, self.stage_sizes, strict=True)):
            for index in range(blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(width, strides, self.conv_impl, self.dtype,
                               name=f"stage{stage + 1}_block{index}")(x, train, mask)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def resnet18(num_classes: int, conv_impl: str = "xla", dtype=jnp.float32) -> ResNet:
    return ResNet(num_classes, (2, 2, 2, 2), BasicBlock, conv_impl, dtype)


def resnet50(num_classes: int, conv_impl: str = "xla", dtype=jnp.float32) -> ResNet:
    return ResNet(num_classes, (3, 4, 6, 3), Bottleneck, conv_impl, dtype)
