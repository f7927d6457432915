"""jaxmem.significance: the permutation null against a direct loop and on data with and without
planted memorization; the margin test's p-values against statsmodels and a brute-force restricted
likelihood, its type-I error at the threshold by simulation; Benjamini-Hochberg on hand-computed
cases; the influence-pairs null and pair tests. Pure numpy on small arrays.

Axis letters: K models, N examples, N_test test examples, E evaluated epochs, R permutations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxmem import significance
from jaxmem.analysis import influence
from jaxmem.errors import UserError
from jaxmem.estimator import memorization_scores, memorized_count
from jaxmem.significance import margin
from jaxmem.significance import null as null_module


def subset_masks(rng, models, examples, ratio=0.5):
    """[K, N] bool, every row with exactly round(ratio * N) True (as the trainer draws them)."""
    masks = np.zeros((models, examples), bool)
    for k in range(models):
        masks[k, rng.permutation(examples)[:round(ratio * examples)]] = True
    return masks


def null_data(seed=0, models=24, examples=2000, planted=0):
    """Correctness independent of membership (per-example accuracy near 0.5), except that the
    first `planted` examples are correct exactly when they are in the model's subset."""
    rng = np.random.default_rng(seed)
    masks = subset_masks(rng, models, examples)
    correct = rng.random((models, examples)) < rng.uniform(0.4, 0.6, examples)
    correct[:, :planted] = masks[:, :planted]
    return masks, correct


def naive_counts(masks, correct, perms, threshold, min_count):
    """[R, E]: permute the membership rows, rescore, count: one estimator pass each."""
    return np.array([[memorized_count(memorization_scores(masks[perm], epoch, min_count)
                                      ["memorization"], threshold) for epoch in correct]
                     for perm in perms])


# ---- permutation null of memorized counts ----------------------------------------------------

def test_null_of_independent_data_contains_the_observed_count():
    masks, correct = null_data()
    null = significance.permutation_null(masks, correct, num_permutations=100, seed=0)
    assert null.samples.shape == (100,) and null.samples.dtype == np.int64
    observed = memorized_count(memorization_scores(masks, correct)["memorization"])
    assert null.observed == observed
    # ~13% of examples near p = 0.5 cross 0.25 by chance at K = 24: noise alone gives hundreds
    assert null.mean > 100
    assert null.samples.min() <= observed <= null.p95
    assert abs(observed - null.mean) < 3 * null.samples.std()
    assert null.p95 == np.percentile(null.samples, 95)
    assert null.pvalue > 0.05
    record = json.loads(json.dumps(null.as_dict()))
    assert record["num_permutations"] == 100 and record["seed"] == 0
    assert record["observed"] == observed and record["p95"] == float(null.p95)


def test_planted_memorization_exceeds_the_null_by_a_wide_margin():
    masks, correct = null_data(planted=300)
    null = significance.permutation_null(masks, correct, num_permutations=50, seed=1)
    assert null.observed > null.p95 + 150
    assert null.pvalue == 1 / 51


@pytest.mark.parametrize("block_bytes", [null_module.BLOCK_BYTES, 64])  # one block / 8 columns
def test_fast_null_equals_permuting_rows_and_rescoring(monkeypatch, block_bytes):
    monkeypatch.setattr(null_module, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(2)
    masks = subset_masks(rng, 70, 203, 0.6)  # K spans two 64-model words; N not a multiple of 8
    correct = rng.random((3, 70, 203)) < np.where(masks, 0.65, 0.5)  # [E, K, N]
    correct[:, :, :5] = True  # never wrong: score 0
    masks[:, 5] = True  # never held out: NaN score, never counted
    perms = significance.permutations(70, 6, seed=3)
    expected = naive_counts(masks, correct, perms, 0.1, 2)
    np.testing.assert_array_equal(significance.permuted_counts(masks, correct, perms, 0.1, 2),
                                  expected)
    null = significance.permutation_null(masks, list(correct), 0.1, 2, num_permutations=6,
                                         seed=3)  # a sequence of epochs, as PackedEpochs
    np.testing.assert_array_equal(null.samples, expected)
    np.testing.assert_array_equal(null.observed, naive_counts(masks, correct, [range(70)], 0.1,
                                                              2)[0])
    np.testing.assert_array_equal(null.mean, expected.mean(axis=0))
    single = significance.permutation_null(masks, correct[-1], 0.1, 2, num_permutations=6,
                                           seed=3)
    np.testing.assert_array_equal(single.samples, expected[:, -1])
    assert isinstance(single.as_dict()["mean"], float)
    assert len(null.as_dict()["p95"]) == 3


def test_null_without_bitwise_count_as_on_numpy_1(monkeypatch):
    masks, correct = null_data(models=70, examples=50)
    perms = significance.permutations(70, 4, seed=0)
    expected = naive_counts(masks, correct[None], perms, 0.25, 5)[:, 0]
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(significance.permuted_counts(masks, correct, perms), expected)


def test_permutations_are_seeded_rows_of_rng_permutation():
    perms = significance.permutations(10, 4, seed=7)
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(perms, [rng.permutation(10) for _ in range(4)])


# ---- p-values of H0: score <= threshold --------------------------------------------------------

def random_tables(rng, size, low=2, high=60):
    n_in, n_out = rng.integers(low, high, size), rng.integers(low, high, size)
    return rng.binomial(n_in, rng.random(size)), rng.binomial(n_out, rng.random(size)), n_in, n_out


def test_margin_pvalues_equal_statsmodels_score_test():
    """statsmodels 0.15's cubic for the restricted estimate has count0 where nobs0 belongs
    (statsmodels issue #10269), which vanishes when every held-out model is right
    (out_correct = out_count): there the p-values must agree to rounding."""
    from statsmodels.stats.proportion import test_proportions_2indep

    rng = np.random.default_rng(0)
    in_correct, _, in_count, out_count = random_tables(rng, 200, low=5, high=80)
    got = significance.margin_pvalues(in_correct, out_count, in_count, out_count, 0.25)
    with np.errstate(all="ignore"):  # statsmodels' odds ratio of p = 1 divides by zero
        expected = [test_proportions_2indep(x, n, m, m, value=0.25, compare="diff",
                                            alternative="larger", method="score").pvalue
                    for x, n, m in zip(in_correct, in_count, out_count, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("threshold", [0.25, 0.15, 0.0, -0.3, 0.6])
def test_margin_pvalues_are_the_score_test_at_the_restricted_maximum(threshold):
    """Everywhere else: the restricted estimate maximises the likelihood (against a grid of
    20,001 points), and the p-value is the score test's formula at it."""
    from scipy.special import ndtr

    rng = np.random.default_rng(1)
    x_in, x_out, n_in, n_out = random_tables(rng, 300)
    x_in[:20], x_out[:20] = n_in[:20], 0  # p = 1 and p = 0
    x_in[20:40], x_out[20:40] = 0, n_out[20:40]
    p_out = margin.restricted_mle(x_in, n_in, x_out, n_out, threshold)
    grid = np.linspace(max(0, -threshold), min(1, 1 - threshold), 20001)[:, None]
    best = margin._log_likelihood(x_in, n_in, x_out, n_out, grid, threshold).max(axis=0)
    assert (margin._log_likelihood(x_in, n_in, x_out, n_out, p_out, threshold)
            >= best - 1e-9).all()
    p_in, total = p_out + threshold, n_in + n_out
    variance = (p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out) * total / (total - 1)
    difference = x_in / n_in - x_out / n_out - threshold
    with np.errstate(divide="ignore", invalid="ignore"):  # variance 0: margin 0, all agree
        expected = np.where(variance > 0, ndtr(-difference / np.sqrt(variance)), 1.0)
    assert (difference[variance == 0] == 0).all()
    got = significance.margin_pvalues(x_in, x_out, n_in, n_out, threshold, min_count=2)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-300)


def test_margin_pvalues_edges_and_low_counts():
    # all right in, all wrong out: score 1, tiny p; all right both: score 0, p near 1
    p = significance.margin_pvalues([30, 30, 3, 0], [0, 20, 0, 0], [30, 30, 3, 30],
                                    [20, 20, 20, 20], 0.25)
    assert p[0] < 1e-7 and p[1] > 0.99
    assert np.isnan(p[2])  # 3 in-models < min_count 5: no score, no test
    assert p[3] > 0.99  # all wrong: score 0
    epochs = significance.margin_pvalues(np.array([[30, 10], [25, 12]]), [[0, 5], [2, 5]],
                                         [30, 20], [20, 20], 0.25)  # [E, N]
    assert epochs.shape == (2, 2)
    np.testing.assert_array_equal(epochs[1], significance.margin_pvalues(
        [25, 12], [2, 5], [30, 20], [20, 20], 0.25))


def test_margin_pvalues_of_merged_parts_equal_the_whole():
    rng = np.random.default_rng(4)
    masks = subset_masks(rng, 40, 30)
    correct = rng.random((40, 30)) < np.where(masks, 0.8, 0.5)
    parts = [(masks[:15], correct[:15]), (masks[15:], correct[15:])]
    in_correct = sum((m & c).sum(0) for m, c in parts)
    out_correct = sum((~m & c).sum(0) for m, c in parts)
    in_count = sum(m.sum(0) for m, _ in parts)
    whole = significance.margin_pvalues((masks & correct).sum(0), (~masks & correct).sum(0),
                                        masks.sum(0), (~masks).sum(0), 0.25)
    np.testing.assert_array_equal(
        significance.margin_pvalues(in_correct, out_correct, in_count, 40 - in_count, 0.25),
        whole)


def boundary_counts(rng, models, p_in, p_out, ratio=0.7):
    """Counts of examples with the given true in-/held-out accuracies: each of the K models
    holds an example with probability `ratio` (Bernoulli masks) and is right with p_in or
    p_out, so the in-count is Binomial(K, ratio) and the correct counts binomial given it."""
    in_count = rng.binomial(models, ratio, np.shape(p_in))
    out_count = models - in_count
    return (rng.binomial(in_count, p_in), rng.binomial(out_count, p_out), in_count, out_count)


@pytest.mark.parametrize("models", [32, 128, 2000])
def test_examples_at_the_threshold_are_selected_at_most_at_the_false_discovery_rate(models):
    """Type I at the boundary, by simulation: half the examples score exactly 0.25 in truth
    (p_out 0, 0.25, 0.5 or 0.75 and p_in 0.25 higher), half are memorized (0.95 vs 0.2).
    Measured (seed 0, 20 simulations of 2,000 examples, q = 0.05), at K = 32 / 128 / 2000:
    share of the boundary examples selected 1.5% / 2.3% / 2.5% (false discovery proportion
    1.8% / 2.3% / 2.4%; memorized found 83% / 100% / 100%); one test at level 0.05 rejects
    4.1% / 5.1% / 5.2% of boundary examples. An example of true score 0.24 at K = 2000, which
    the old rule (score > 0.25 and a test of score > 0) let in 34% of the time, is rejected at
    level 0.05 2.1% of the time."""
    rng = np.random.default_rng(0)
    p_out = np.concatenate([np.repeat([0.0, 0.25, 0.5, 0.75], 250), np.full(1000, 0.2)])
    p_in = np.concatenate([p_out[:1000] + 0.25, np.full(1000, 0.95)])
    shares, found = [], []
    for _ in range(20):
        pvalues = significance.margin_pvalues(*boundary_counts(rng, models, p_in, p_out), 0.25)
        selected = significance.benjamini_hochberg(pvalues, 0.05)
        shares.append(selected[:1000].mean())
        found.append(selected[1000:].mean())
    assert np.mean(shares) <= 0.03
    assert np.mean(found) > (0.8 if models == 32 else 0.99)
    single = significance.margin_pvalues(*boundary_counts(rng, models, p_in[:1000].repeat(10),
                                                          p_out[:1000].repeat(10)), 0.25)
    assert np.nanmean(single <= 0.05) <= 0.06
    below = significance.margin_pvalues(*boundary_counts(rng, 2000, np.full(10000, 0.74),
                                                         np.full(10000, 0.5)), 0.25)
    assert np.mean(below <= 0.05) <= 0.03  # true score 0.24 at K = 2000


# ---- Benjamini-Hochberg and the FDR-controlled memorized set ---------------------------------

def test_benjamini_hochberg_by_hand():
    # m = 4 finite: rank thresholds k q / m = 0.0125, 0.025, 0.0375, 0.05
    p = np.array([0.01, 0.04, 0.03, 0.20, np.nan])  # only rank 1 passes
    assert significance.benjamini_hochberg(p, 0.05).tolist() == [True, False, False, False,
                                                                 False]
    step_up = np.array([0.045, 0.03, 0.035, 0.01])  # rank 2 fails, rank 4 passes: all four
    assert significance.benjamini_hochberg(step_up, 0.05).all()
    rows = np.stack([np.append(step_up, np.nan), p])  # row-wise on [E, N]
    np.testing.assert_array_equal(significance.benjamini_hochberg(rows, 0.05),
                                  [[True, True, True, True, False],
                                   [True, False, False, False, False]])
    assert not significance.benjamini_hochberg(np.full(3, np.nan)).any()
    assert not significance.benjamini_hochberg(np.array([0.5, 0.9])).any()


def test_benjamini_hochberg_matches_scipy_adjusted_pvalues():
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.uniform(0, 1e-3, 30), rng.uniform(0, 1, 300)])
    adjusted = scipy_stats.false_discovery_control(p, method="bh")
    for q in (0.01, 0.05, 0.2):
        np.testing.assert_array_equal(significance.benjamini_hochberg(p, q), adjusted <= q)


def test_benjamini_hochberg_over_a_larger_family():
    p = np.array([0.001, 0.004, 0.3])  # m = 3: thresholds 0.0167, 0.033: both small pass
    assert significance.benjamini_hochberg(p, 0.05).tolist() == [True, True, False]
    # m = 100: thresholds 0.0005, 0.001, 0.0015: nothing passes ...
    assert not significance.benjamini_hochberg(p, 0.05, num_tests=100).any()
    # ... m = 40: thresholds 0.00125, 0.0025: rank 1 passes, rank 2 (0.004) does not
    assert significance.benjamini_hochberg(p, 0.05, num_tests=40).tolist() == [True, False,
                                                                                 False]
    with pytest.raises(UserError):
        significance.benjamini_hochberg(p, 0.05, num_tests=2)


def test_memorized_at_fdr_keeps_planted_examples_drops_chance_crossings_and_canaries():
    masks, correct = null_data(planted=100)
    in_count, out_count = masks.sum(0), (~masks).sum(0)
    pvalues = significance.margin_pvalues((masks & correct).sum(0), (~masks & correct).sum(0),
                                          in_count, out_count, 0.25)
    scores = memorization_scores(masks, correct)["memorization"]
    real = np.ones(2000, bool)
    chosen = significance.memorized_at_fdr(pvalues, real, q=0.05)
    assert chosen.dtype == bool and chosen.shape == (2000,)
    assert not (chosen & ~(scores > 0.25)).any()  # a subset of the memorized set
    assert chosen[:100].all()
    assert (scores[100:] > 0.25).sum() > 100  # chance crossings...
    assert chosen[100:].sum() <= 5  # ...mostly dropped
    real[:10] = False  # canaries: never selected, and not hypotheses
    without = significance.memorized_at_fdr(pvalues, real, q=0.05)
    assert not without[:10].any() and without[10:100].all()
    np.testing.assert_array_equal(
        without, significance.benjamini_hochberg(np.where(real, pvalues, np.nan), 0.05))
    both = significance.memorized_at_fdr(np.stack([pvalues, pvalues]), real, q=0.05)
    np.testing.assert_array_equal(both, [without, without])


# ---- influence pairs -------------------------------------------------------------------------

def pair_data(seed=6, models=64, examples=40, tests=20):
    """Training example 0 is correct, and test example 0 is correct, exactly when example 0
    is in the subset; everything else is right 90% of the time, independently."""
    rng = np.random.default_rng(seed)
    masks = subset_masks(rng, models, examples)
    correct_train = rng.random((models, examples)) < 0.9
    correct_test = rng.random((models, tests)) < 0.9
    correct_train[:, 0] = correct_test[:, 0] = masks[:, 0]
    return masks, correct_train, correct_test


def test_planted_pair_has_a_tiny_pvalue_and_exceeds_the_pairs_null():
    masks, correct_train, correct_test = pair_data()
    p = significance.pair_pvalues(masks, correct_test, [0, 0, 3], [0, 5, 0])
    assert p[0] < 1e-9  # influence 1
    member = masks[:, 3]
    expected = significance.margin_pvalues((member & correct_test[:, 0]).sum(),
                                           (~member & correct_test[:, 0]).sum(), member.sum(),
                                           (~member).sum(), 0.15)
    assert p[2] == expected and p[1] > 0.5
    null = significance.pairs_null(masks, correct_train, correct_test, num_permutations=50)
    assert null.samples.shape == (50,)
    assert null.observed >= 1 and null.observed > null.p95


def test_pairs_null_equals_rescoring_and_influence_py_for_each_permutation():
    rng = np.random.default_rng(7)
    masks = subset_masks(rng, 24, 60)
    correct_train = rng.random((24, 60)) < 0.5
    correct_test = rng.random((24, 30)) < 0.5

    def pairs(membership):  # the count jaxmem.analysis.influence reports
        scores = memorization_scores(membership, correct_train)["memorization"]
        return len(influence.high_influence_pairs(influence.influence(membership, correct_test),
                                                  scores))

    null = significance.pairs_null(masks, correct_train, correct_test, num_permutations=5,
                                   seed=2)
    perms = significance.permutations(24, 5, seed=2)
    assert null.observed == pairs(masks) > 0
    np.testing.assert_array_equal(null.samples, [pairs(masks[perm]) for perm in perms])


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m, c: significance.permutation_null(m, c[:, :-1]),
    lambda m, c: significance.permutation_null(m, [c, c[:-1]]),
    lambda m, c: significance.permutation_null(m, c, num_permutations=0),
    lambda m, c: significance.permutation_null(m, c, num_permutations=2.5),
    lambda m, c: significance.margin_pvalues([1, 2], [1, 2], [5, 5], [5, 5], 1.0),
    lambda m, c: significance.margin_pvalues([6, 2], [1, 2], [5, 5], [5, 5], 0.25),
    lambda m, c: significance.margin_pvalues([1.5, 2], [1, 2], [5, 5], [5, 5], 0.25),
    lambda m, c: significance.benjamini_hochberg(np.array([0.1, 0.2]), q=0),
    lambda m, c: significance.benjamini_hochberg(np.array([0.1, 0.2]), q=1.5),
    lambda m, c: significance.memorized_at_fdr(np.array([0.1, 0.2]), [True, True], q=1.0),
    lambda m, c: significance.pairs_null(m, c, c[:-1]),
    lambda m, c: significance.pairs_null(m, c, c, num_permutations=-1),
    lambda m, c: significance.pair_pvalues(m, c, [0, 99], [0, 1]),
    lambda m, c: significance.permuted_counts(m, c, [[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]),
])
def test_bad_input_is_a_one_line_user_error(call):
    masks, correct = null_data(models=10, examples=12)
    with pytest.raises(UserError) as error:
        call(masks, correct)
    assert "\n" not in str(error.value)
