"""The noise floor of memorization counts (jaxmem.significance): the permutation null against a
direct loop and on data with and without planted memorization, exact p-values against
scipy.stats.fisher_exact, Benjamini-Hochberg on hand-computed cases, and the influence-pairs
null. Pure numpy on small arrays.

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


@pytest.mark.parametrize("block_bytes", [significance.BLOCK_BYTES, 64])  # one block / 8 columns
def test_fast_null_equals_permuting_rows_and_rescoring(monkeypatch, block_bytes):
    monkeypatch.setattr(significance, "BLOCK_BYTES", block_bytes)
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


# ---- p-values ----------------------------------------------------------------------------------

def test_pvalues_equal_fisher_exact_greater():
    rng = np.random.default_rng(3)
    masks = subset_masks(rng, 30, 12)
    correct = rng.random((2, 30, 12)) < np.where(masks, rng.uniform(0.3, 1, 12),
                                                 rng.uniform(0, 0.7, 12))
    correct[0, :, 0] = masks[:, 0]  # planted: tiny p-value
    correct[0, :, 1] = True  # all correct: p = 1
    masks[:27, 2], masks[27:, 2] = True, False  # 3 held out: NaN at min_count 5
    got = significance.membership_pvalues(masks, correct)  # [E, N]
    assert got.shape == (2, 12)
    for e in range(2):
        for i in range(12):
            inside, outside = correct[e, masks[:, i], i], correct[e, ~masks[:, i], i]
            if i == 2:
                assert np.isnan(got[e, i])
                continue
            table = [[inside.sum(), (~inside).sum()], [outside.sum(), (~outside).sum()]]
            expected = scipy_stats.fisher_exact(table, alternative="greater").pvalue
            np.testing.assert_allclose(got[e, i], expected, rtol=1e-9)
    assert got[0, 0] < 1e-7 and got[0, 1] == 1.0
    np.testing.assert_array_equal(significance.membership_pvalues(masks, correct[1]), got[1])


def test_pvalues_from_counts_of_merged_parts_equal_the_whole():
    rng = np.random.default_rng(4)
    masks = subset_masks(rng, 40, 30)
    correct = rng.random((40, 30)) < np.where(masks, 0.8, 0.5)
    parts = [(masks[:15], correct[:15]), (masks[15:], correct[15:])]
    in_correct = sum((m & c).sum(0) for m, c in parts)
    out_correct = sum((~m & c).sum(0) for m, c in parts)
    in_count = sum(m.sum(0) for m, _ in parts)
    got = significance.pvalues_from_counts(in_correct, out_correct, in_count, 40 - in_count)
    np.testing.assert_array_equal(got, significance.membership_pvalues(masks, correct))


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


def test_memorized_fdr_keeps_planted_examples_and_drops_chance_crossings():
    masks, correct = null_data(planted=100)
    scores = memorization_scores(masks, correct)["memorization"]
    chosen = significance.memorized_fdr(masks, correct, q=0.05)
    assert chosen.dtype == bool and chosen.shape == (2000,)
    assert not (chosen & ~(scores > 0.25)).any()  # a subset of the memorized set
    assert chosen[:100].all()
    assert (scores[100:] > 0.25).sum() > 100  # chance crossings...
    assert chosen[100:].sum() <= 5  # ...mostly dropped
    both = significance.memorized_fdr(masks, np.stack([correct, correct]), q=0.05)
    np.testing.assert_array_equal(both, [chosen, chosen])


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
    assert p[0] < 1e-15  # 1 / C(64, 32)
    inside = correct_test[masks[:, 3], 0]
    outside = correct_test[~masks[:, 3], 0]
    table = [[inside.sum(), (~inside).sum()], [outside.sum(), (~outside).sum()]]
    np.testing.assert_allclose(p[2], scipy_stats.fisher_exact(table, "greater").pvalue,
                               rtol=1e-9)
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
    memorized = memorization_scores(masks, correct_train)["memorization"] > 0.25
    assert significance.high_influence_pair_count(masks, memorized, correct_test) == pairs(masks)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m, c: significance.permutation_null(m, c[:, :-1]),
    lambda m, c: significance.permutation_null(m, [c, c[:-1]]),
    lambda m, c: significance.permutation_null(m, c, num_permutations=0),
    lambda m, c: significance.permutation_null(m, c, num_permutations=2.5),
    lambda m, c: significance.membership_pvalues(m, c.T),
    lambda m, c: significance.benjamini_hochberg(np.array([0.1, 0.2]), q=0),
    lambda m, c: significance.benjamini_hochberg(np.array([0.1, 0.2]), q=1.5),
    lambda m, c: significance.memorized_fdr(m, c, q=1.0),
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
