"""The per-model step's loss: padding rows (weight 0) are selected away, not multiplied by 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmem.train.step import StepSpec, weighted_loss

SPEC = StepSpec(model=None, tx=optax.sgd(0.1), num_classes=4, mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize("poison", [np.inf, -np.inf, np.nan])
def test_padding_rows_of_inf_or_nan_change_neither_loss_nor_gradient(poison):
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    labels = jnp.array([0, 3, 1, 2, 2])
    weights = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0])
    loss_and_grad = jax.value_and_grad(lambda z: weighted_loss(SPEC, z, labels, weights))
    clean_loss, clean_grad = loss_and_grad(logits)
    kept = np.asarray(weights) > 0
    mean_of_kept = optax.softmax_cross_entropy_with_integer_labels(
        logits[kept], labels[kept]).mean()
    np.testing.assert_allclose(clean_loss, mean_of_kept, rtol=1e-6)
    poisoned = logits.at[2].set(poison).at[4, 1].set(poison)
    loss, grad = loss_and_grad(poisoned)
    assert loss == clean_loss
    np.testing.assert_array_equal(grad, clean_grad)
    assert not np.asarray(grad)[~kept].any()
