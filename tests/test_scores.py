import numpy as np

from jaxmem.estimator import (
    correct_counts,
    from_counts,
    membership_counts,
    memorization_scores,
    memorized_count,
)


def direct(masks, correct, min_count):
    """The estimator written out example by example."""
    k, n = masks.shape
    mem, se = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        inside, outside = correct[masks[:, i], i], correct[~masks[:, i], i]
        if len(inside) < min_count or len(outside) < min_count:
            continue
        mem[i] = inside.mean() - outside.mean()
        se[i] = np.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
    return mem, se


def test_scores_equal_direct_numpy_computation():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 300)) < 0.7
    correct = rng.random((40, 300)) < np.where(masks, 0.9, 0.5)
    got = memorization_scores(masks, correct, min_count=5)
    mem, se = direct(masks, correct, 5)
    np.testing.assert_allclose(got["memorization"], mem, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["memorization_se"], se, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got["low_count"], np.isnan(mem))


def test_scores_by_epoch_and_from_summed_parts():
    rng = np.random.default_rng(1)
    masks = rng.random((30, 50)) < 0.7
    correct = rng.random((3, 30, 50)) < 0.6  # [E, K, N]
    whole = memorization_scores(masks, correct)
    # counts of two halves of the ensemble add up to the whole (how waves/parts combine)
    parts = [(masks[:12], correct[:, :12]), (masks[12:], correct[:, 12:])]
    in_c = sum(correct_counts(m, c)[0] for m, c in parts)
    out_c = sum(correct_counts(m, c)[1] for m, c in parts)
    in_n = sum(membership_counts(m)[0] for m, _ in parts)
    out_n = sum(membership_counts(m)[1] for m, _ in parts)
    summed = from_counts(in_c, out_c, in_n, out_n)
    np.testing.assert_array_equal(summed["memorization"], whole["memorization"])
    for e in range(3):
        np.testing.assert_allclose(whole["memorization"][e], direct(masks, correct[e], 5)[0])


def test_low_counts_are_flagged_exactly_and_nan():
    masks = np.zeros((10, 4), bool)
    masks[:, 0] = True  # never held out
    masks[:5, 1] = True  # 5 in, 5 out: scored at min_count 5
    masks[:6, 2] = True  # 6 in, 4 out: flagged
    masks[:4, 3] = True  # 4 in, 6 out: flagged
    correct = np.ones((10, 4), bool)
    got = memorization_scores(masks, correct, min_count=5)
    np.testing.assert_array_equal(got["low_count"], [True, False, True, True])
    assert np.isnan(got["memorization"][[0, 2, 3]]).all()
    assert got["memorization"][1] == 0.0


def test_memorized_count_ignores_nan_and_uses_strict_threshold():
    scores = np.array([[0.25, 0.26, np.nan, 0.9], [0.0, 0.1, 0.3, np.nan]])
    np.testing.assert_array_equal(memorized_count(scores, 0.25), [2, 1])
