"""True-class margins (jaxmem/margins.py): their fixed point, their exact sums, and what a
trained wave records."""

import jax
import numpy as np

from jaxmem import keys, margins
from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.masks import run_masks
from jaxmem.train import step as step_lib
from jaxmem.train.loop import Trainer

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples, 10 classes, 8x8x1


def test_fixed_point_margins_carry_the_correctness_in_their_sign():
    margin = np.array([2.5, -1.25, 0.0, 0.0, 1e-6, -1e-6, 1e4, -1e4, 0.3])
    correct = np.array([True, False, True, False, True, False, True, False, True])
    units = margins.quantize(margin, correct)
    assert units.dtype == np.int16
    np.testing.assert_array_equal(units, [320, -160, 1, -1, 1, -1, margins.LIMIT,
                                          -margins.LIMIT, 38])
    np.testing.assert_array_equal(units > 0, correct)  # ties (margin 0) by the argmax's rule
    np.testing.assert_allclose(margins.logits(units)[[0, 1, 8]], [2.5, -1.25, 0.296875])


def test_sums_are_exact_in_any_grouping_and_leave_excluded_models_out():
    rng = np.random.default_rng(0)
    units = rng.integers(-margins.LIMIT, margins.LIMIT, (3, 12, 40)).astype(np.int16)  # [E, m, N]
    masks = rng.random((12, 40)) < 0.7
    included = np.ones(12, bool)
    included[[4, 9]] = False
    whole = margins.MarginSums.of(units, masks, included)
    groups = [[7, 3, 11], [0, 1], [2, 4, 5, 6, 8, 9, 10]]
    parts = [margins.MarginSums.of(units[:, g], masks[g], included[g]).sums for g in groups]
    np.testing.assert_array_equal(margins.combine([{"margin_sums": p} for p in parts]).sums,
                                  whole.sums)
    kept = units[:, included].astype(np.int64)
    inside, held = masks[included], ~masks[included]
    want = np.stack([(kept * inside).sum(1), (kept**2 * inside).sum(1), (kept * held).sum(1),
                     (kept**2 * held).sum(1)], axis=1)
    np.testing.assert_array_equal(whole.sums, want)
    named = whole.named()
    np.testing.assert_allclose(named["out_sum"], want[:, 2] / margins.SCALE)
    np.testing.assert_allclose(named["in_sumsq"], want[:, 1] / margins.SCALE**2)
    assert margins.combine([{"margin_sums": parts[0]}, {}]) is None


def test_an_evaluation_records_every_models_margin_from_its_own_logits():
    """From first principles: each model applied on its own (no model axis), its true-class
    logit minus its largest other logit, against what the ensemble's evaluation recorded."""
    config = Config(arch="tiny_cnn", num_models=3, epochs=1, batch_size=64, seed=3,
                    recalibrate_bn=False, eval_batch_size=64)
    trainer = Trainer(config, DATASET)
    indices, masks = np.arange(3), run_masks(config, DATASET.num_train)
    init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, indices))
    states = trainer.ensemble.init(jax.device_put(init_keys, trainer.ensemble.model_sharding))
    result = trainer.empty_wave(3)
    trainer._evaluate(states, None, 0, result, masks)

    images, labels = np.asarray(DATASET.x_train), np.asarray(DATASET.y_train)
    one_model = jax.jit(lambda state: step_lib.eval_logits(trainer.ensemble.eval_spec, state,
                                                            images))
    rows = np.arange(len(labels))
    for k in indices:
        logits = np.asarray(one_model(jax.tree.map(lambda leaf, k=k: leaf[k], states)),
                            np.float64)
        other = np.where(np.eye(10, dtype=bool)[labels], -np.inf, logits).max(-1)
        want = (logits[rows, labels] - other) * margins.SCALE
        # float32 forward passes with and without the model axis agree to ~1e-6 logits
        assert np.abs(result["margins"][0, k] - want).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(result["margins"][0] > 0, result["correct_train"][0])
