"""DESIGN property 1: a held-out example has zero influence on the model that holds it out.

Training model k with its mask on the shared full batches must equal training it on the same
batches with its held-out examples physically removed: parameters, BatchNorm statistics and
optimiser state, with augmentation on.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.train import keys
from jaxmem.train.ensemble import Ensemble, make_mesh
from jaxmem.train.loop import build_spec, epoch_order
from jaxmem.train.masks import subset_masks
from jaxmem.train.step import init_state, train_step

SEED, BATCH, STEPS = 5, 64, 2  # the first 2 of the epoch's 5 steps


def test_masked_training_equals_training_on_the_subset():
    dataset = make(seed=1, sizes=(1, 2, 4, 8, 16))  # 310 examples, 8x8x1
    config = Config(arch="tiny_cnn", batch_size=BATCH, lr=0.2, epochs=1, flip=True, translate=1,
                    seed=SEED)
    steps_per_epoch = -(-dataset.num_train // BATCH)
    spec = build_spec(config, dataset, steps_per_epoch)
    assert spec.flip and spec.translate == 1
    ensemble = Ensemble(spec, dataset.image_shape, BATCH, make_mesh(), "vmap")
    model_indices = np.array([0, 1])
    masks = subset_masks(SEED, model_indices, dataset.num_train, config.subset_ratio)
    x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    states = ensemble.init(jax.random.key_data(keys.model_keys(SEED, keys.INIT, model_indices)))
    aug_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(
        keys.model_keys(SEED, keys.AUGMENT, model_indices))
    order = epoch_order(SEED, 0, dataset.num_train, steps_per_epoch, BATCH)
    totals = jnp.zeros((2, 3))
    for step in range(STEPS):
        states, totals = ensemble.train_step(states, totals, jnp.asarray(masks),
                                             jax.random.key_data(aug_keys), x, y, order, step)

    # Model 1 (second in the ensemble) trained alone on the physically subsetted batches.
    k = 1
    single = init_state(spec, keys.model_keys(SEED, keys.INIT, [k])[0], dataset.image_shape)
    step_fn = jax.jit(lambda s, xb, yb, ids, w: train_step(spec, s, xb, yb, ids, w, aug_keys[k]))
    order_np = np.asarray(order)
    trained = 0
    for step in range(STEPS):
        ids = order_np[step * BATCH:(step + 1) * BATCH]
        ids = ids[masks[k, ids]]
        trained += len(ids)
        single, _ = step_fn(single, x[ids], y[ids], jnp.asarray(ids), jnp.ones(len(ids)))

    assert trained == int(np.asarray(totals)[k, 2])  # the ensemble counted the same examples
    mine = jax.tree.map(lambda leaf: leaf[k], states)
    flat_mine = jax.tree_util.tree_leaves_with_path(mine)
    flat_single = jax.tree.leaves(single)
    assert len(flat_mine) == len(flat_single)
    for (path, got), want in zip(flat_mine, flat_single, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # and the held-out examples really were in the batches (the test is not vacuous)
    held_out_seen = sum((~masks[k, order_np[s * BATCH:(s + 1) * BATCH]]).sum()
                        for s in range(STEPS))
    assert held_out_seen > 15
