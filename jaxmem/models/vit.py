"""Vision Transformers (Dosovitskiy et al. 2021) sized for small images, timm-compatible.

Patch embedding (a linear map of each p x p patch), a learned cls token, learned position
embeddings sized to the patch grid, `depth` pre-LayerNorm blocks (multi-head self-attention with a
fused qkv projection, then an MLP with exact GELU), a final LayerNorm and a linear head on the cls
token. No dropout, no batch statistics: `train` and `mask` are accepted and ignored, so a held-out
example cannot influence another example's output. `conv_impl` is ignored too: the patch
embedding is a reshape and one matmul, which vmap turns into a batched matmul.

  vit_tiny   width 192, depth 12, 3 heads, MLP 768
  vit_small  width 384, depth 12, 6 heads, MLP 1536

Patch size p = max(1, min(H, W) // 8) unless given, so 8x8 to 64x64 inputs all get about an 8x8
grid (p = 1 at 8x8, 4 at 32x32, 8 at 64x64); a remainder of H % p rows (W % p columns) is cropped
evenly from both sides. Trainable parameters at 32x32x3 / 10 classes, 32x32x3 / 100 classes,
64x64x3 / 200 classes: vit_tiny 5.36M / 5.38M / 5.43M; vit_small 21.34M / 21.38M / 21.47M.

Parameter names mirror timm's (`pretrained.load_timm_vit` maps them one to one):
  cls_token [1,1,D], pos_embed [1,1+N,D], patch_embed/{kernel [p,p,Ch,D], bias},
  blocks_{i}/{norm1, attn/{qkv [D,3D], proj}, norm2, mlp/{fc1, fc2}}, norm, head.
The qkv output is ordered (q|k|v, head, channel), as in timm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# name -> (width, depth, heads, mlp width)
CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
}
LAYERNORM_EPSILON = 1e-6  # timm's ViT value


def default_patch_size(height: int, width: int) -> int:
    return max(1, min(height, width) // 8)


class PatchEmbed(nn.Module):
    """x [B,H,W,Ch] -> tokens [B, gh*gw, D] (row-major grid), a p x p stride-p linear map."""

    features: int
    patch_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        batch, height, width, channels = x.shape
        grid_h, grid_w = height // p, width // p
        top, left = (height - grid_h * p) // 2, (width - grid_w * p) // 2
        x = x[:, top:top + grid_h * p, left:left + grid_w * p]
        patches = x.reshape(batch, grid_h, p, grid_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h * grid_w, p * p * channels)  # (i, j, c) order
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (p, p, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel = kernel.reshape(p * p * channels, self.features).astype(self.dtype)
        return patches.astype(self.dtype) @ kernel + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention, x [B,N,D] -> [B,N,D]; softmax in float32."""

    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B,N,heads,hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
        return nn.Dense(width, dtype=self.dtype, name="proj")(y)


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class Block(nn.Module):
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        norm = dict(epsilon=LAYERNORM_EPSILON, dtype=self.dtype)
        y = nn.LayerNorm(**norm, name="norm1")(x)
        x = x + Attention(self.num_heads, self.dtype, name="attn")(y)
        y = nn.LayerNorm(**norm, name="norm2")(x)
        return x + Mlp(self.mlp_dim, self.dtype, name="mlp")(y)


class ViT(nn.Module):
    num_classes: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    conv_impl: str = "xla"  # unused: no convolutions
    dtype: jnp.dtype = jnp.float32
    patch_size: int | None = None  # None: default_patch_size(H, W)

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        del train, mask  # no dropout, no batch statistics
        patch = self.patch_size or default_patch_size(*x.shape[1:3])
        x = PatchEmbed(self.width, patch, self.dtype, name="patch_embed")(x)
        batch, tokens, _ = x.shape
        cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                               (1, 1 + tokens, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype),
                                              (batch, 1, self.width)), x], axis=1)
        x = x + pos_embed.astype(self.dtype)
        for index in range(self.depth):
            x = Block(self.num_heads, self.mlp_dim, self.dtype, name=f"blocks_{index}")(x)
        x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0]).astype(
            jnp.float32)


def create(arch: str, num_classes: int, conv_impl: str = "xla", dtype=jnp.float32) -> ViT:
    width, depth, heads, mlp_dim = CONFIGS[arch]
    return ViT(num_classes, width, depth, heads, mlp_dim, conv_impl, dtype)
