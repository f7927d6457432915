"""Property 1 (docs/design.md): a held-out example has no influence on the model holding it out.

The ensemble trains each model on batches it draws from its own subset of the shared on-device
dataset. Model k trained that way must equal model k trained alone on the physically subsetted
dataset (parameters, BatchNorm statistics, optimiser state; augmentation on; through the epoch's
padded last batch), and changing the images and labels of k's held-out examples must not change
model k at all: the changed data goes through the loader and the step is rebuilt from it, so
anything computed from the whole training set (normalisation constants) is covered too.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import data, keys
from jaxmem.config import Config
from jaxmem.data import Dataset
from jaxmem.data.synthetic import make
from jaxmem.masks import subset_masks
from jaxmem.train.ensemble import ONCE_PER_WAVE_OPTIONS, Ensemble, make_mesh
from jaxmem.train.loop import build_spec
from jaxmem.train.optim import schedule_for
from jaxmem.train.orders import model_orders, steps_per_epoch
from jaxmem.train.step import init_state, train_step

SEED, BATCH, MODELS = 5, 64, np.array([0, 1])


def as_user_file(path, x_train, y_train, test) -> Dataset:
    """The arrays saved as a user's .npz and loaded back, as a run loads its data."""
    np.savez(path, x_train=x_train, y_train=y_train, x_test=test.x_test, y_test=test.y_test)
    return data.load(str(path))


def leaves(state):
    return jax.tree_util.tree_leaves_with_path(state)


def test_ensemble_training_equals_training_on_the_physical_subset(tmp_path):
    generated = make(seed=1, sizes=(1, 2, 4, 8, 16))  # 310 examples, 8x8x1; subsets of 217
    dataset = as_user_file(tmp_path / "data.npz", generated.x_train, generated.y_train,
                           generated)
    num = dataset.num_train
    steps = steps_per_epoch(num, 0.7, BATCH)  # 4 steps, the last with 25 examples
    config = Config(arch="tiny_cnn", batch_size=BATCH, lr=0.2, epochs=1, flip=True, translate=1,
                    seed=SEED)
    spec = build_spec(config, dataset)
    schedule = schedule_for(config, steps)
    assert spec.flip and spec.translate == 1
    masks = subset_masks(SEED, MODELS, num, config.subset_ratio)
    orders = model_orders(SEED, MODELS, masks, 0, steps, BATCH)
    aug_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(
        keys.model_keys(SEED, keys.AUGMENT, MODELS))

    def train_ensemble(data):
        """The ensemble step built from `data` as a run builds it (normalisation included)."""
        ensemble = Ensemble(build_spec(config, data), data.image_shape, BATCH,
                            make_mesh(), "vmap")
        images, labels = data.x_train, data.y_train
        states = ensemble.init(jax.random.key_data(keys.model_keys(SEED, keys.INIT, MODELS)))
        totals = ensemble.zero_totals(len(MODELS))
        for step in range(steps):
            states, totals = ensemble.train_step(states, totals, orders,
                                                 jax.random.key_data(aug_keys),
                                                 jnp.asarray(images), jnp.asarray(labels), step,
                                                 schedule)
        return states, jax.tree.map(np.asarray, totals)

    states, totals = train_ensemble(dataset)

    # Model 1 trained alone on a dataset that holds only its subset, in its own order.
    k = 1
    members = np.flatnonzero(masks[k])
    x_sub, y_sub = dataset.x_train[members], dataset.y_train[members]
    single = jax.jit(lambda key: init_state(spec, key, dataset.image_shape),  # as the ensemble's
                     compiler_options=ONCE_PER_WAVE_OPTIONS.get(jax.default_backend()))(
        keys.model_keys(SEED, keys.INIT, [k])[0])
    step_fn = jax.jit(lambda s, xb, yb, ids, w: train_step(spec, s, xb, yb, ids, w, aug_keys[k],
                                                           schedule))
    order = np.asarray(orders[k])
    assert sorted(order[order < num]) == list(members)  # one epoch = the subset, once each
    for step in range(steps):
        ids = order[step * BATCH:(step + 1) * BATCH]
        ids = ids[ids < num]
        where = np.searchsorted(members, ids)
        single, _ = step_fn(single, x_sub[where], y_sub[where], jnp.asarray(ids),
                            jnp.ones(len(ids)))
    assert len(ids) == 25  # the last batch was padded, and the padding had no effect
    assert totals.examples[k] == len(members)  # the ensemble counted exactly the subset

    mine = jax.tree.map(lambda leaf: leaf[k], states)
    flat_single = jax.tree.leaves(single)
    assert len(leaves(mine)) == len(flat_single)
    for (path, got), want in zip(leaves(mine), flat_single, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))

    # Rewrite every example model 1 holds out: model 1 stays the same, model 0 changes.
    held_out = ~masks[k]
    images, labels = dataset.x_train.copy(), dataset.y_train.copy()
    images[held_out] = 255 - images[held_out]
    labels[held_out] = (labels[held_out] + 1) % dataset.num_classes
    changed, _ = train_ensemble(as_user_file(tmp_path / "changed.npz", images, labels, generated))
    for (path, got), want in zip(leaves(changed), jax.tree.leaves(states), strict=True):
        np.testing.assert_array_equal(got[k], want[k], err_msg=jax.tree_util.keystr(path))
    assert any(not np.array_equal(got[0], want[0])
               for (_, got), want in zip(leaves(changed), jax.tree.leaves(states), strict=True))
