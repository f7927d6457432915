"""Model registry: `create(name, num_classes)` returns a Flax module for ONE model.

Every model is called as `model.apply(variables, x, train, mask)` with x [B,H,W,Ch] float
(normalised), mask [B] (which examples count for BatchNorm statistics; None = all), and returns
logits [B, C] float32. Adding an architecture is one constructor and one line in `ARCHS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmem.errors import UserError
from jaxmem.models import resnet, small, vgg, vit
from jaxmem.models.layers import CONV_IMPLS

# name -> constructor(num_classes, conv_impl, dtype) -> nn.Module
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "tiny_cnn": small.TinyCNN,
    **{name: functools.partial(vgg.VGG, layout=layout) for name, layout in vgg.LAYOUTS.items()},
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    **{name: functools.partial(vit.create, name) for name in vit.CONFIGS},
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create(name: str, num_classes: int, *, conv_impl: str = "xla",
           dtype: str = "float32") -> nn.Module:
    """A Flax module for one model. conv_impl chooses the convolution lowering (layers.py);
    dtype the compute dtype (parameters stay float32)."""
    if name not in ARCHS:
        raise UserError(f"unknown arch {name!r}; choose one of {', '.join(sorted(ARCHS))}")
    if conv_impl not in CONV_IMPLS:
        raise UserError(f"unknown conv impl {conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return ARCHS[name](num_classes=num_classes, conv_impl=conv_impl, dtype=DTYPES[dtype])


def param_count(name: str, num_classes: int, image_shape: tuple[int, int, int]) -> int:
    """Number of trainable parameters, from shapes only (nothing is allocated)."""
    model = create(name, num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, *image_shape)), False))
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"])))


__all__ = ["ARCHS", "create", "param_count"]
