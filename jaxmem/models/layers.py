"""The layers whose ensemble lowering decides throughput, kept in one place.

Models are written for ONE model; the trainer adds the model axis with `jax.vmap`. Under vmap a
`lax.conv` whose input differs per model lowers to a grouped convolution, which is slow on CPU
(BENCHMARKS.md: 3.7 GFLOP/s vs 22 single-model) and its backward pass is slow on GPU too
(jax-ml/jax#13800). `conv_impl="im2col"` writes the same convolution as shifted slices and one
matmul, which vmap turns into a batched matmul instead. Both take the same parameters, so a run
can switch lowering without changing results (tests/test_layers.py checks outputs and grads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

CONV_IMPLS = ("xla", "im2col")


def conv2d(x, kernel, strides: int, impl: str):
    """'SAME'-padded 2-d convolution. x [B,H,W,Ci], kernel [kh,kw,Ci,Co] -> [B,H',W',Co]."""
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if impl != "im2col":
        raise ValueError(f"unknown conv_impl {impl!r}; choose one of {CONV_IMPLS}")
    kh, kw, ci, co = kernel.shape
    return im2col_columns(x, kh, kw, strides) @ kernel.reshape(kh * kw * ci, co)


def im2col_columns(x, kh: int, kw: int, strides: int):
    """x [B,H,W,Ci] -> [B,H',W',kh*kw*Ci]: the 'SAME'-padded input patch under every output
    position, flattened in (i, j, c) order (the kernel's HWIO layout)."""
    height, width = x.shape[1:3]
    out_h, out_w = -(-height // strides), -(-width // strides)
    # The same padding rule as XLA's "SAME": total = max((out-1)*s + k - in, 0), low gets floor.
    pad_h = max((out_h - 1) * strides + kh - height, 0)
    pad_w = max((out_w - 1) * strides + kw - width, 0)
    padded = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                         (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    patches = [
        padded[:, i:i + (out_h - 1) * strides + 1:strides, j:j + (out_w - 1) * strides + 1:strides]
        for i in range(kh) for j in range(kw)
    ]
    return jnp.concatenate(patches, axis=-1)


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, 'VALID' (odd sizes drop the last row/column, as nn.max_pool).

    x [B,H,W,C] -> [B,H//2,W//2,C]. Written as reshape + max instead of `nn.max_pool`: its
    backward is an elementwise compare-and-select, while reduce_window's backward is
    select_and_scatter, slow on CPU (M=4 x 128 x 32x32x64 fwd+bwd under vmap: 849 ms vs
    ~170 ms; BENCHMARKS.md). Same outputs; the same gradients except at exact ties inside a
    window, which a 'max' leaves undefined (here they share the gradient equally; after a ReLU
    tied zeros get zero gradient either way).
    """
    batch, height, width, channels = x.shape
    height, width = height // 2 * 2, width // 2 * 2
    x = x[:, :height, :width]
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class Conv(nn.Module):
    """'SAME' convolution with the parameter layout of `flax.linen.Conv` and a chosen lowering."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = False
    impl: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.he_normal(),
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.impl)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


BN_MOMENTUM = 0.9  # running = m * running + (1 - m) * batch statistics


class BatchNorm(nn.Module):
    """BatchNorm whose training statistics use only the examples with mask 1.

    x [B, ..., F]; mask [B] bool/float or None (all examples). An example outside the mask (the
    padding of an epoch's last batch) has no influence on the output of the others, on the
    running statistics or on any gradient, even when it holds inf or NaN (rows are selected
    away, never multiplied by 0), and its own output is finite and independent of its input. A
    batch with no masked-in example keeps the old running statistics and stays finite (no 0/0).
    Statistics are computed in float32 whatever the input dtype.

    Kept instead of `flax.linen.BatchNorm(...)(x, mask=...)`, which gives the same outputs and
    statistics on finite inputs (max difference 5e-7) but NaN parameter gradients when a
    masked-out row holds a NaN, and NaN running statistics for an all-masked batch.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if not train:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
            return ((x - running_mean.value.astype(x.dtype)) * inv.astype(x.dtype)
                    + bias.astype(x.dtype))
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        shape = (-1,) + (1,) * (x.ndim - 1)
        keep = jnp.ones(x.shape[:1], bool) if mask is None else mask.astype(bool)
        keep = keep.reshape(shape)
        weights = keep.astype(jnp.float32)
        # Rows outside the mask are selected away (jnp.where) before anything else, so an inf or
        # NaN there cannot reach the statistics, the other rows or the gradients (0 * inf is
        # NaN); then the weighted sums give them exactly 0. (Zeroing their output as well made
        # XLA compile one model and several models differently: runs stopped being bit-equal
        # across wave sizes.)
        xf = jnp.where(keep, xf, 0.0)
        per_example = 1
        for size in x.shape[1:-1]:
            per_example *= size
        count = weights.sum() * per_example
        denom = jnp.maximum(count, 1.0)
        mean = (xf * weights).sum(axes) / denom
        var = (jnp.square(xf - mean) * weights).sum(axes) / denom
        if not self.is_initializing():
            seen = count > 0
            m = self.momentum
            running_mean.value = jnp.where(seen, m * running_mean.value + (1 - m) * mean,
                                           running_mean.value)
            running_var.value = jnp.where(seen, m * running_var.value + (1 - m) * var,
                                          running_var.value)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        # From the sanitised rows: an outside row's output is finite and independent of its input.
        return ((xf.astype(x.dtype) - mean.astype(x.dtype)) * inv.astype(x.dtype)
                + bias.astype(x.dtype))
