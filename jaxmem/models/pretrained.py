"""Initialise our ViTs (vit.py) from local timm-layout safetensors files; nothing is downloaded.

`load_timm_vit(path, params, arch)` returns a copy of `params` with every tensor but the head
taken from the file (the head is ours: the classes differ). Two tensors are resized when the
file's geometry differs from ours:
- position embeddings: the cls position is kept, the grid part is resized bilinearly from the
  file's g x g grid to ours;
- the patch-embedding kernel, from the file's patch size P to ours p, as w' = A^T w with A the
  bilinear resize of a p x p patch to P x P: our patch then embeds exactly as the file's model
  embeds that patch resized to P x P (a constant patch keeps its embedding). At p = 1 this sums
  the P x P kernel. A 1-channel input gets the kernel summed over RGB (timm's rule).
Any problem with the file (missing, not safetensors, a tensor missing or of another shape, e.g. a
vit_small file for vit_tiny) raises UserError with a one-line message naming it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from jaxmem.errors import UserError
from jaxmem.models import vit


def load_timm_vit(path: str, params: dict, arch: str,
                  grid: tuple[int, int] | None = None) -> dict:
    """A new params pytree for `vit.create(arch, ...)` initialised from a timm ViT file.

    params: our freshly initialised params (`variables["params"]`) of one model, or of an
    ensemble with a leading model axis M (every model then gets the same pretrained tensors; the
    heads stay as given). grid: our patch grid (gh, gw); None = square, read from pos_embed.
    """
    if arch not in vit.CONFIGS:
        raise UserError(f"no timm mapping for arch {arch!r}; choose one of "
                        f"{', '.join(sorted(vit.CONFIGS))}")
    width, depth, _, mlp_dim = vit.CONFIGS[arch]
    ours = traverse_util.flatten_dict(params, sep="/")
    _check_ours(ours, arch, width, depth)
    lead = ours["cls_token"].ndim - 3  # 1 with an ensemble axis, else 0
    tensors = _read_safetensors(path)

    patch_weight, file_channels = _check_file(tensors, path, arch, width, depth, mlp_dim)

    # Our geometry, from our params.
    patch, _, channels, _ = ours["patch_embed/kernel"].shape[lead:]
    tokens = ours["pos_embed"].shape[lead + 1] - 1
    if grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise UserError(f"our pos_embed has {tokens} grid tokens, not a square: pass grid")
        grid = (side, side)
    if grid[0] * grid[1] != tokens:
        raise UserError(f"grid {grid} does not match our {tokens} position tokens")
    if channels not in (file_channels, 1):
        raise UserError(f"{path}: patch embedding for {file_channels} channels cannot be adapted "
                        f"to {channels}-channel inputs")

    converted = {}
    for ours_name, (timm_name, convert) in _mapping(depth).items():
        converted[ours_name] = convert(tensors[timm_name])
    converted["pos_embed"] = _resize_pos_embed(tensors["pos_embed"], grid)
    converted["patch_embed/kernel"] = _resize_patch_kernel(patch_weight, patch, channels)

    new = dict(ours)
    for name, value in converted.items():
        target = ours[name]
        if tuple(value.shape) != tuple(target.shape[lead:]):
            raise UserError(f"{path}: {name} converts to shape {tuple(value.shape)}, "
                            f"our model has {tuple(target.shape[lead:])}")
        new[name] = jnp.broadcast_to(jnp.asarray(value, target.dtype), target.shape)
    return traverse_util.unflatten_dict(new, sep="/")


def _check_file(tensors: dict, path: str, arch: str, width: int, depth: int, mlp_dim: int):
    """The file's geometry checked against the arch before anything is converted; returns the
    patch embedding weight and the file's input channels."""
    patch_weight = _get(tensors, "patch_embed.proj.weight", path)
    pos_embed = _get(tensors, "pos_embed", path)
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise UserError(f"{path}: patch_embed.proj.weight has shape {patch_weight.shape}, "
                        f"expected [D, 3, P, P]")
    file_patch, file_channels = patch_weight.shape[2], patch_weight.shape[1]
    file_tokens = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else -1
    file_grid = math.isqrt(max(file_tokens, 0))
    if file_tokens < 1 or file_grid * file_grid != file_tokens:
        raise UserError(f"{path}: pos_embed has shape {pos_embed.shape}, expected [1, 1+g*g, D] "
                        f"(a cls position and a square grid)")
    if f"blocks.{depth}.norm1.weight" in tensors:
        raise UserError(f"{path}: has more than {depth} blocks; not a {arch} checkpoint")
    expected = _timm_shapes(width, depth, mlp_dim, file_patch, file_channels, file_tokens)
    for name, shape in expected.items():  # wrong shapes first: they say more than gaps do
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"{arch} expects {shape}; is it a checkpoint of another ViT size?")
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise UserError(f"{path}: missing tensors for {arch}: {shown}")
    return patch_weight, file_channels


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> array, float32; UserError when the file is missing or not safetensors."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights {path}: no such file")
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None
    return {name: np.asarray(value, np.float32) for name, value in tensors.items()}


def _get(tensors: dict, name: str, path: str) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"{path}: missing tensor {name}; not a timm ViT checkpoint")
    return tensors[name]


def _check_ours(ours: dict, arch: str, width: int, depth: int) -> None:
    needed = ("cls_token", "pos_embed", "patch_embed/kernel", f"blocks_{depth - 1}/attn/qkv/kernel")
    if any(name not in ours for name in needed) or f"blocks_{depth}/norm1/scale" in ours:
        raise UserError(f"params are not those of our {arch} ViT (expected {', '.join(needed)})")
    if ours["cls_token"].shape[-1] != width:
        raise UserError(f"params have width {ours['cls_token'].shape[-1]}, {arch} has {width}")


def _timm_shapes(width, depth, mlp_dim, patch, channels, tokens) -> dict[str, tuple]:
    """Every timm tensor we take (not the head), with its shape."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, 1 + tokens, width),
        "patch_embed.proj.weight": (width, channels, patch, patch),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    for i in range(depth):
        block = f"blocks.{i}"
        shapes.update({
            f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
            f"{block}.attn.qkv.weight": (3 * width, width), f"{block}.attn.qkv.bias": (3 * width,),
            f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
            f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
            f"{block}.mlp.fc1.weight": (mlp_dim, width), f"{block}.mlp.fc1.bias": (mlp_dim,),
            f"{block}.mlp.fc2.weight": (width, mlp_dim), f"{block}.mlp.fc2.bias": (width,),
        })
    return shapes


def _mapping(depth: int) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """our flat name -> (timm name, conversion) for the tensors taken without resizing."""
    same = np.asarray
    linear = np.transpose  # torch Linear weight [out, in] -> Flax Dense kernel [in, out]
    mapping = {
        "cls_token": ("cls_token", same),
        "patch_embed/bias": ("patch_embed.proj.bias", same),
        "norm/scale": ("norm.weight", same),
        "norm/bias": ("norm.bias", same),
    }
    for i in range(depth):
        ours, timm = f"blocks_{i}", f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            mapping[f"{ours}/{norm}/scale"] = (f"{timm}.{norm}.weight", same)
            mapping[f"{ours}/{norm}/bias"] = (f"{timm}.{norm}.bias", same)
        for layer in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
            timm_layer = layer.replace("/", ".")
            mapping[f"{ours}/{layer}/kernel"] = (f"{timm}.{timm_layer}.weight", linear)
            mapping[f"{ours}/{layer}/bias"] = (f"{timm}.{timm_layer}.bias", same)
    return mapping


def _resize_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[1, 1+g*g, D] -> [1, 1+gh*gw, D]: cls position kept, the grid resized bilinearly."""
    width = pos_embed.shape[-1]
    side = math.isqrt(pos_embed.shape[1] - 1)
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[0, 1:].reshape(side, side, width)
    if (side, side) != tuple(grid):
        grid_pos = np.asarray(jax.image.resize(grid_pos, (*grid, width), "bilinear"))
    return np.concatenate([cls_pos, grid_pos.reshape(1, grid[0] * grid[1], width)], axis=1)


def _resize_patch_kernel(weight: np.ndarray, patch: int, channels: int) -> np.ndarray:
    """timm [D, Ch, P, P] -> ours [p, p, channels, D] (w' = A^T w, A: bilinear p x p -> P x P)."""
    kernel = np.transpose(weight, (2, 3, 1, 0))  # [P, P, Ch, D]
    if channels != kernel.shape[2]:  # 1-channel input: the RGB kernels summed
        kernel = kernel.sum(axis=2, keepdims=True)
    file_patch = kernel.shape[0]
    if patch == file_patch:
        return kernel

    def upsize(small):  # A: [p, p, Ch, D] -> [P, P, Ch, D], linear
        return jax.image.resize(small, (file_patch, file_patch, *small.shape[2:]), "bilinear")

    _, transpose = jax.vjp(upsize, jnp.zeros((patch, patch, *kernel.shape[2:]), jnp.float32))
    return np.asarray(transpose(jnp.asarray(kernel))[0])
