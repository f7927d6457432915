"""True-class margins (jaxmem/margins.py): their fixed point, their exact sums, and what a
trained wave records."""

import jax
import numpy as np
import pytest
from conftest import simulated_margins

from jaxmem import keys, margins
from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.masks import run_masks
from jaxmem.train import step as step_lib
from jaxmem.train.loop import Trainer

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples, 10 classes, 8x8x1


def test_fixed_point_margins_carry_the_correctness_in_their_sign():
    margin = np.array([2.5, -1.25, 0.0, 0.0, 1e-6, -1e-6, 1e4, -1e4, 0.3, np.nan, np.inf])
    correct = np.array([True, False, True, False, True, False, True, False, True, True, False])
    units = margins.quantize(margin, correct)
    assert units.dtype == np.int16
    np.testing.assert_array_equal(units, [320, -160, 1, -1, 1, -1, margins.LIMIT,
                                          -margins.LIMIT, 38, 1, -1])  # NaN: a diverged model
    np.testing.assert_array_equal(units > 0, correct)  # ties (margin 0) by the argmax's rule
    np.testing.assert_allclose(margins.logits(units)[[0, 1, 8]], [2.5, -1.25, 0.296875])


def test_sums_are_exact_in_any_grouping_and_leave_excluded_models_out(monkeypatch):
    """... also summed a few models at a time, as a wave's sums are (bounded temporaries)."""
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
    monkeypatch.setattr(margins, "SUM_BLOCK_BYTES", 8 * 40 * 3)  # 3 models at a time
    np.testing.assert_array_equal(margins.MarginSums.of(units, masks, included).sums, want)
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


def test_the_margin_estimate_is_unbiased_with_standard_errors_that_cover_the_truth():
    """Simulated margins whose distributions are known: the estimate's mean error is ~0 and
    +-1.96 standard errors cover the true score in ~95% of examples, at K = 16 and 128; with
    the same models it is closer to the truth than the plain estimator."""
    from jaxmem import estimator

    for num_models in (16, 128):
        masks, units, truth = simulated_margins(num_models, seed=num_models)
        sums = margins.MarginSums.of(units[None], masks, np.ones(num_models, bool))
        fitted = margins.memorization_margin(masks.sum(0), (~masks).sum(0), sums)
        estimate, se = fitted["memorization_margin"][0], fitted["memorization_margin_se"][0]
        both_sides = masks.any(0) & (~masks).any(0)
        np.testing.assert_array_equal(np.isfinite(estimate), both_sides)  # NaN: a side empty
        error, se = (estimate - truth)[both_sides], se[both_sides]
        assert abs(error.mean()) < 3 * error.std() / np.sqrt(len(error)) + 1e-3
        covered = np.mean(np.abs(error) <= 1.96 * se)
        assert 0.925 <= covered <= 0.97, (num_models, covered)
        plain = estimator.memorization_scores(masks, units > 0, 2)["memorization"]
        scored = np.isfinite(plain)  # within both_sides
        assert np.mean((estimate - truth)[scored] ** 2) < 0.75 * np.mean(
            (plain - truth)[scored] ** 2)


def test_with_few_models_each_variance_leans_on_the_prior_fitted_across_examples():
    """Per-example variances drawn from a scaled inverse chi-square with 8 degrees of freedom
    and scale 4: the prior fitted to 3,000 examples' sample variances (dof 20 each) recovers
    them, and a variance from 2 models is mostly the prior's; the prior follows the mean where
    the spread does."""
    rng = np.random.default_rng(0)
    true_var = 8 * 4.0 / rng.chisquare(8, 3000)
    sample_var = true_var * rng.chisquare(20, 3000) / 20
    prior_dof, prior_var = margins.moderated_prior(sample_var, np.full(3000, 20.0),
                                                   np.zeros(3000))
    assert 6 < prior_dof < 11 and np.allclose(prior_var, 4.0, rtol=0.15)
    # one example of 2 models and one of 500, both with a sample variance of 100, among the
    # others (mean 0: the sum of squares is (n - 1) times the sample variance)
    count = np.concatenate([np.full(3000, 21.0), [2.0, 500.0]])
    fits = margins.normal_fits(count, np.zeros(3002),
                               (count - 1) * np.concatenate([sample_var, [100.0, 100.0]]))
    few, many = fits.variance[-2:]
    assert 4 < few < 25 and 95 < many < 100  # the prior's pull: ~(8 * 4 + 1 * 100) / 9
    assert fits.dof[-2] == pytest.approx(prior_dof + 1, rel=0.1)
    # spread that grows with the mean: the prior's variance grows with it
    mean = np.linspace(-5, 5, 3000)
    trend_var = np.exp(mean / 2) * rng.chisquare(20, 3000) / 20
    _, trend_prior = margins.moderated_prior(trend_var, np.full(3000, 20.0), mean)
    assert trend_prior[-1] > 8 * trend_prior[0]
