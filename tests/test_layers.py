"""Every convolution lowering computes the same outputs and gradients; masked BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import linen as nn

from jaxmem.models.layers import CONV_IMPLS, BatchNorm, conv2d, max_pool_2x2


@pytest.mark.parametrize("shape,kernel,strides", [
    ((2, 8, 8, 3), 3, 1), ((2, 7, 9, 4), 3, 2), ((1, 8, 8, 2), 1, 1)])
def test_conv_impls_agree_in_value_and_gradient(shape, kernel, strides):
    x = normal(0, shape)
    w = normal(1, (kernel, kernel, shape[-1], 5))
    ref = None
    for impl in CONV_IMPLS:  # jitted, as a run calls them: one compile, not one per operation
        f = lambda x, w, impl=impl: conv2d(x, w, strides, impl)  # noqa: E731
        out = jax.jit(f)(x, w)
        grads = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))),
                                 argnums=(0, 1)))(x, w)
        if ref is None:
            ref = (out, grads)
            continue
        np.testing.assert_allclose(out, ref[0], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref[1], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_impls_agree_under_vmap():
    xs = normal(0, (3, 2, 6, 6, 4))
    ws = normal(1, (3, 3, 3, 4, 5))
    outs = [jax.vmap(lambda x, w, i=impl: conv2d(x, w, 1, i))(xs, ws) for impl in CONV_IMPLS]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_batchnorm_with_empty_mask_keeps_statistics_and_stays_finite():
    bn = BatchNorm()
    x = normal(0, (4, 3, 3, 2)) * 3 + 1
    variables = bn.init(jax.random.key(0), x, False)
    out, updates = bn.apply(variables, x, True, jnp.zeros(4, bool), mutable=["batch_stats"])
    assert np.isfinite(np.asarray(out)).all()
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    grad = jax.grad(lambda v: bn.apply(v, x, True, jnp.zeros(4, bool),
                                       mutable=["batch_stats"])[0].sum())(variables)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))


def test_batchnorm_mask_equals_subset():
    bn = BatchNorm()
    x = normal(0, (6, 2, 2, 3))
    mask = jnp.array([1, 0, 1, 1, 0, 1], bool)
    variables = bn.init(jax.random.key(0), x, False)
    full, full_stats = bn.apply(variables, x, True, mask, mutable=["batch_stats"])
    sub, sub_stats = bn.apply(variables, x[mask], True, mutable=["batch_stats"])
    np.testing.assert_allclose(full[mask], sub, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 full_stats, sub_stats)


@pytest.mark.parametrize("poison", [np.inf, np.nan])
def test_batchnorm_rows_outside_the_mask_change_nothing_even_when_not_finite(poison):
    bn = BatchNorm()
    x = normal(1, (6, 2, 2, 3))
    mask = jnp.array([1, 0, 1, 1, 0, 1], bool)
    variables = bn.init(jax.random.key(0), x, False)

    def forward(params, inputs):
        y, updates = bn.apply({**variables, "params": params}, inputs, True, mask,
                              mutable=["batch_stats"])
        return (y ** 2).sum(), (y, updates["batch_stats"])

    grad_of = jax.jit(jax.grad(forward, has_aux=True))  # one program for both inputs
    clean_grads, (clean_y, clean_stats) = grad_of(variables["params"], x)
    poisoned = x.at[1].set(poison).at[4, 0, 1, 2].set(poison)
    grads, (y, stats) = grad_of(variables["params"], poisoned)
    np.testing.assert_array_equal(y, clean_y)  # masked rows too: finite, input ignored
    jax.tree.map(np.testing.assert_array_equal, stats, clean_stats)
    jax.tree.map(np.testing.assert_array_equal, grads, clean_grads)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pool_2x2_equals_flax_max_pool_in_value_and_gradient(shape):
    x = normal(0, shape)  # no ties: the gradients agree exactly

    def flax_pool(v):
        return nn.max_pool(v, (2, 2), (2, 2))

    def grad(f, v):  # jitted, as a run calls them: one compile, not one per operation
        return jax.jit(jax.grad(lambda v: jnp.sum(jnp.cos(f(v)))))(v)

    np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), flax_pool(x))
    np.testing.assert_allclose(grad(max_pool_2x2, x), grad(flax_pool, x), rtol=1e-6, atol=1e-6)
    xs = jnp.stack([x, -x])  # under vmap (the ensemble's model axis)
    np.testing.assert_array_equal(jax.jit(jax.vmap(max_pool_2x2))(xs), jax.vmap(flax_pool)(xs))
    np.testing.assert_allclose(grad(jax.vmap(max_pool_2x2), xs), grad(jax.vmap(flax_pool), xs),
                               rtol=1e-6, atol=1e-6)
