"""The per-model step's loss: padding rows (weight 0) are selected away, not multiplied by 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normal

from jaxmem.train.step import StepSpec, normalize, weighted_loss

SPEC = StepSpec(model=None, optimizer=lambda schedule: optax.sgd(0.1), num_classes=4,
                mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize("poison", [np.inf, -np.inf, np.nan])
def test_padding_rows_of_inf_or_nan_change_neither_loss_nor_gradient(poison):
    logits = normal(0, (5, 4))
    labels = jnp.array([0, 3, 1, 2, 2])
    weights = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0])
    # jitted, as in a run: one compile for the three poisons
    loss_and_grad = jax.jit(jax.value_and_grad(lambda z: weighted_loss(SPEC, z, labels, weights)))
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


def test_recomputed_batchnorm_statistics_are_the_subsets_own():
    """One batch holding a model's whole subset: eval mode with the recomputed statistics gives
    the train-mode outputs on that batch (whatever the running averages were); padding rows and
    the examples outside the subset change nothing."""
    from jaxmem import models
    from jaxmem.train.step import init_state, subset_batch_stats

    spec = StepSpec(models.create("tiny_cnn", 4), SPEC.optimizer, 4, (0.5,), (0.25,))
    # numpy inputs and jitted programs: one compile each, not one per operation
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (12, 8, 8, 1), np.uint8))
    state = jax.jit(lambda key: init_state(spec, key, (8, 8, 1)))(jax.random.key(0))
    stale = jax.tree.map(lambda s: s + 3.0, state.batch_stats)  # far from any batch's
    state = state._replace(batch_stats=stale)
    subset = jnp.array([[0, 2, 3, 5, 7, 8, 11, 11]])  # [S=1, B=8], the last one padding
    weights = jnp.array([[1.0] * 7 + [0.0]])
    recompute = jax.jit(lambda s, data: subset_batch_stats(spec, s, data, subset, weights))
    stats = recompute(state, images)
    variables = {"params": state.params, "batch_stats": stats}
    x = normalize(spec, images[subset[0, :7]])
    eval_logits, (train_logits, _) = jax.jit(lambda v, x: (
        spec.model.apply(v, x, False), spec.model.apply(v, x, True, mutable=["batch_stats"])))(
        variables, x)
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-4, atol=1e-4)
    changed = images.at[1].set(255).at[4].set(0)  # outside the subset
    jax.tree.map(np.testing.assert_array_equal, recompute(state, changed), stats)
