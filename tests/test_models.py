"""The model zoo: sizes against the paper, shapes at every input size, masked BatchNorm, timm."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from safetensors.numpy import save_file
from scipy.special import erf

from jaxmem.errors import UserError
from jaxmem.models import ARCHS, create, param_count, vit
from jaxmem.models.pretrained import load_timm_vit

# The paper's table (32x32x3 inputs, 10 classes); ours must be within 10%.
PAPER_PARAMS = {
    "small_vgg": 0.5e6, "med_vgg": 1e6, "large_vgg": 7.5e6, "vgg19": 20e6,
    "resnet18": 11e6, "resnet50": 24e6, "vit_tiny": 5e6, "vit_small": 22e6,
}


def test_registry_holds_every_paper_arch():
    assert set(PAPER_PARAMS) <= set(ARCHS)
    with pytest.raises(UserError, match="resnet50"):
        create("resnet101", 10)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
    count = param_count(name, 10, (32, 32, 3))
    assert abs(count - PAPER_PARAMS[name]) <= 0.1 * PAPER_PARAMS[name], count


def _forward_shapes(model, image_shape, batch=2):
    """Shapes of (variables, eval logits) from init and of (train logits, updated statistics)
    from a masked train-mode apply; nothing is compiled or allocated."""

    def run(x, mask):
        eval_logits, variables = model.init_with_output(jax.random.key(0), x, False)
        logits, updates = model.apply(variables, x, True, mask, mutable=["batch_stats"])
        return variables, eval_logits, logits, updates

    return jax.eval_shape(run, jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
                          jax.ShapeDtypeStruct((batch,), jnp.bool_))


def _numpy_variables(model, image_shape, seed=0):
    """Variables with the model's structure, drawn with numpy: compiling a big model's random
    init costs tens of seconds on CPU, and the properties tested here hold for any values.
    Kernels are He-scaled, BN scales near 1, running variances positive."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if len(leaf.shape) >= 2 and "kernel" in name:
            return noise * np.float32(np.sqrt(2 / np.prod(leaf.shape[:-1])))
        if "scale" in name or "'var'" in name:
            return 1 + 0.2 * np.abs(noise)
        return 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("size", [8, 32, 64])
@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_forward_shapes(name, size):
    classes = 7
    variables, eval_logits, train_logits, updates = _forward_shapes(create(name, classes),
                                                                    (size, size, 3))
    for logits in (eval_logits, train_logits):
        assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    # train=True updates exactly the running statistics there are (none for ViT).
    assert jax.tree.structure(updates) == jax.tree.structure(
        {k: v for k, v in variables.items() if k == "batch_stats"})
    assert (("batch_stats" in variables) == (not name.startswith("vit")))


@pytest.mark.parametrize("name", ["med_vgg", "resnet18", "vit_tiny"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    model = create(name, 10, conv_impl="im2col", dtype="bfloat16")
    variables, eval_logits, train_logits, _ = _forward_shapes(model, (16, 16, 3))
    assert eval_logits.dtype == train_logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_vit_pos_embed_follows_the_patch_grid():
    model = create("vit_tiny", 10)
    shapes = {size: jax.eval_shape(lambda size=size: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), False))["params"] for size in (8, 28, 64)}
    # patch = max(1, size // 8): 8 -> 1 (8x8 grid), 28 -> 3 (9x9, one row cropped), 64 -> 8 (8x8)
    assert shapes[8]["pos_embed"].shape == (1, 65, 192)
    assert shapes[28]["pos_embed"].shape == (1, 82, 192)
    assert shapes[28]["patch_embed"]["kernel"].shape == (3, 3, 3, 192)
    assert shapes[64]["patch_embed"]["kernel"].shape == (8, 8, 3, 192)


@pytest.mark.parametrize("name", ["small_vgg", "resnet18"])
def test_held_out_examples_have_no_influence(name):
    """Masked BatchNorm: the kept examples get the logits and running statistics they would get
    from the physically subsetted batch, and a held-out example's pixels change nothing."""
    model = create(name, 10)
    images = normal(1, (4, 8, 8, 3))
    mask = jnp.array([True, False, True, True])
    variables = _numpy_variables(model, (8, 8, 3), seed=2)
    apply = jax.jit(lambda variables, x, mask: model.apply(variables, x, True, mask,
                                                           mutable=["batch_stats"]))

    logits, updates = apply(variables, images, mask)
    subset_logits, subset_updates = apply(variables, images[np.asarray(mask)], None)
    # Equal up to float32 summation order; resnet18's last blocks normalise 3 values at 1x1
    # over which BatchNorm amplifies that rounding (measured up to 3.6e-4 on logits near 1).
    np.testing.assert_allclose(logits[np.asarray(mask)], subset_logits, rtol=1e-3, atol=1e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 updates, subset_updates)
    # The statistics did move (the comparison above is not between two untouched inits).
    assert not any(np.allclose(new, old) for new, old in zip(
        jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"]),
        strict=True))

    changed = images.at[1].set(1e3 * normal(3, (8, 8, 3)))
    changed_logits, changed_updates = apply(variables, changed, mask)
    np.testing.assert_array_equal(changed_logits[np.asarray(mask)], logits[np.asarray(mask)])
    jax.tree.map(np.testing.assert_array_equal, changed_updates, updates)


# ---- timm loader ---------------------------------------------------------------------------

def _timm_tensors(width, depth, mlp_dim, patch, grid, seed=0, classes=1000):
    """Random tensors with timm's ViT names and shapes (head for 1000 classes)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(0, 0.02, shape).astype(np.float32)

    tensors = {
        "cls_token": normal(1, 1, width),
        "pos_embed": normal(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": normal(width, 3, patch, patch),
        "patch_embed.proj.bias": normal(width),
        "norm.weight": 1 + normal(width), "norm.bias": normal(width),
        "head.weight": normal(classes, width), "head.bias": normal(classes),
    }
    for i in range(depth):
        block = f"blocks.{i}"
        tensors.update({
            f"{block}.norm1.weight": 1 + normal(width), f"{block}.norm1.bias": normal(width),
            f"{block}.attn.qkv.weight": normal(3 * width, width),
            f"{block}.attn.qkv.bias": normal(3 * width),
            f"{block}.attn.proj.weight": normal(width, width),
            f"{block}.attn.proj.bias": normal(width),
            f"{block}.norm2.weight": 1 + normal(width), f"{block}.norm2.bias": normal(width),
            f"{block}.mlp.fc1.weight": normal(mlp_dim, width),
            f"{block}.mlp.fc1.bias": normal(mlp_dim),
            f"{block}.mlp.fc2.weight": normal(width, mlp_dim),
            f"{block}.mlp.fc2.bias": normal(width),
        })
    return tensors


TINY = vit.CONFIGS["vit_tiny"]  # (width, depth, heads, mlp)


@pytest.fixture(scope="module")
def tiny_model():
    """vit_tiny at 8x8 inputs (patch 1, 8x8 grid) and its fresh params."""
    model = create("vit_tiny", 10)
    return model, _numpy_variables(model, (8, 8, 3))["params"]


def test_timm_loader_resizes_and_keeps_our_head(tmp_path, tiny_model):
    _, params = tiny_model
    width, depth, _, mlp_dim = TINY
    tensors = _timm_tensors(width, depth, mlp_dim, patch=16, grid=14)  # like *_patch16_224
    path = str(tmp_path / "vit_tiny.safetensors")
    save_file(tensors, path)

    loaded = load_timm_vit(path, params, "vit_tiny")

    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    np.testing.assert_array_equal(loaded["blocks_0"]["attn"]["qkv"]["kernel"],
                                  tensors["blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(loaded["blocks_11"]["mlp"]["fc2"]["kernel"],
                                  tensors["blocks.11.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(loaded["blocks_5"]["norm2"]["scale"],
                                  tensors["blocks.5.norm2.weight"])
    np.testing.assert_array_equal(loaded["norm"]["bias"], tensors["norm.bias"])
    np.testing.assert_array_equal(loaded["cls_token"], tensors["cls_token"])
    # Position embeddings: 14x14 grid -> our 8x8, cls position kept.
    assert loaded["pos_embed"].shape == (1, 65, width)
    np.testing.assert_array_equal(loaded["pos_embed"][:, 0], tensors["pos_embed"][:, 0])
    # Patch 16 -> 1: a 1x1 patch embeds as the file's model embeds it upsampled to 16x16, i.e.
    # a constant patch, so the kernel is the 16x16 kernel summed over space.
    np.testing.assert_allclose(loaded["patch_embed"]["kernel"][0, 0],
                               tensors["patch_embed.proj.weight"].sum((2, 3)).T,
                               rtol=1e-5, atol=1e-6)
    # The head is ours, untouched.
    jax.tree.map(np.testing.assert_array_equal, loaded["head"], params["head"])

    # An ensemble's params (leading model axis): every model gets the file, heads stay per model.
    stacked = jax.tree.map(lambda leaf: np.stack([leaf, leaf + 1]), params)
    loaded_stack = load_timm_vit(path, stacked, "vit_tiny")
    for index in range(2):
        model_params = jax.tree.map(lambda leaf, i=index: leaf[i], loaded_stack)
        expected = dict(loaded, head=jax.tree.map(lambda leaf, i=index: leaf + i, params["head"]))
        jax.tree.map(np.testing.assert_array_equal, model_params, expected)


def _layer_norm(x, scale, bias, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * scale + bias


def _timm_reference_features(tensors, images, heads):
    """timm's ViT forward (numpy, float64) up to the final norm's cls token: [B, D]."""
    t = {name: value.astype(np.float64) for name, value in tensors.items()}
    weight = t["patch_embed.proj.weight"]  # [D, 3, p, p], here p = 1: a per-pixel linear map
    assert weight.shape[2:] == (1, 1)
    batch, height, width_px, _ = images.shape
    x = images.reshape(batch, height * width_px, 3) @ weight[:, :, 0, 0].T
    x = x + t["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(t["cls_token"], (batch, 1, x.shape[-1])), x], axis=1)
    x = x + t["pos_embed"]
    tokens, dim = x.shape[1:]
    head_dim = dim // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in t:
        b = f"blocks.{i}"
        y = _layer_norm(x, t[f"{b}.norm1.weight"], t[f"{b}.norm1.bias"])
        qkv = y @ t[f"{b}.attn.qkv.weight"].T + t[f"{b}.attn.qkv.bias"]
        qkv = qkv.reshape(batch, tokens, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv  # [B, heads, N, hd]
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
        x = x + y @ t[f"{b}.attn.proj.weight"].T + t[f"{b}.attn.proj.bias"]
        y = _layer_norm(x, t[f"{b}.norm2.weight"], t[f"{b}.norm2.bias"])
        y = y @ t[f"{b}.mlp.fc1.weight"].T + t[f"{b}.mlp.fc1.bias"]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        x = x + y @ t[f"{b}.mlp.fc2.weight"].T + t[f"{b}.mlp.fc2.bias"]
        i += 1
    return _layer_norm(x, t["norm.weight"], t["norm.bias"])[:, 0]


def test_timm_loaded_model_computes_timms_forward(tmp_path, tiny_model):
    """Same geometry as the file (patch 1, 8x8 grid): nothing resized, and our forward with the
    loaded params equals timm's forward (written out in numpy) followed by our head."""
    model, params = tiny_model
    width, depth, heads, mlp_dim = TINY
    tensors = _timm_tensors(width, depth, mlp_dim, patch=1, grid=8, seed=1)
    for name in tensors:  # larger q/k weights than an init, so attention is far from uniform
        if "qkv.weight" in name:
            tensors[name] = tensors[name] * 10
    path = str(tmp_path / "vit_tiny_patch1.safetensors")
    save_file(tensors, path)

    loaded = load_timm_vit(path, params, "vit_tiny")
    np.testing.assert_array_equal(loaded["pos_embed"], tensors["pos_embed"])

    images = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
    logits = jax.jit(model.apply)({"params": loaded}, images)
    features = _timm_reference_features(tensors, images, heads)
    expected = features @ np.asarray(loaded["head"]["kernel"], np.float64) + np.asarray(
        loaded["head"]["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)


def _user_error(path, params, arch, match):
    with pytest.raises(UserError, match=match) as caught:
        load_timm_vit(path, params, arch)
    assert "\n" not in str(caught.value)


def test_timm_loader_errors(tmp_path, tiny_model):
    _, params = tiny_model
    width, depth, _, mlp_dim = TINY

    _user_error(str(tmp_path / "absent.safetensors"), params, "vit_tiny", "no such file")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file" * 10)
    _user_error(str(garbage), params, "vit_tiny", "not a readable safetensors")

    # A vit_small-width file for vit_tiny (two blocks are enough to be recognised).
    small_width, _, _, small_mlp = vit.CONFIGS["vit_small"]
    wrong = str(tmp_path / "vit_small.safetensors")
    save_file(_timm_tensors(small_width, 2, small_mlp, patch=16, grid=14), wrong)
    _user_error(wrong, params, "vit_tiny", r"cls_token has shape \(1, 1, 384\).*vit_tiny")

    tensors = _timm_tensors(width, depth, mlp_dim, patch=16, grid=14)
    del tensors["blocks.3.mlp.fc1.bias"]
    incomplete = str(tmp_path / "incomplete.safetensors")
    save_file(tensors, incomplete)
    _user_error(incomplete, params, "vit_tiny",
                r"missing tensors for vit_tiny: blocks\.3\.mlp\.fc1\.bias")
    # Our params are vit_tiny's: asking for vit_small is refused before the file is read.
    _user_error(incomplete, params, "vit_small", "vit_small")
    _user_error(incomplete, params, "resnet18", "no timm mapping")
