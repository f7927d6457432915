"""Each run's own reliability (jaxmem/reliability.py): split halves, Spearman-Brown, the models
a reliability needs, and the agreement it predicts against independent runs."""

import json

import numpy as np
import pytest
from conftest import simulated_margins
from scipy.stats import spearmanr

from jaxmem import estimator, margins, reliability


def test_spearman_brown_and_the_models_a_reliability_needs():
    assert reliability.spearman_brown(0.5, 2.0) == pytest.approx(2 / 3)
    assert np.isnan(reliability.spearman_brown(-0.2, 2.0))
    # rho 0.5 from 16 models: n = 0.9 * 0.5 / (0.5 * 0.1) = 9 times as many
    assert reliability.models_for(0.9, 0.5, 16) == pytest.approx(144)
    assert reliability.models_for(0.9, 0.0, 16) == float("inf")
    # the two formulas agree: the models found for a target reach it
    models = reliability.models_for(0.8, 0.3, 10)
    assert reliability.spearman_brown(0.3, models / 10) == pytest.approx(0.8)
    a, b = reliability.halves(9, seed=3, split=0)
    assert len(a) == 4 and len(b) == 5 and not set(a) & set(b)
    assert not np.array_equal(a, reliability.halves(9, seed=3, split=1)[0])


def independent_agreement(first, second):
    """Spearman correlation of two runs' scores (both estimators) over the examples some
    model of either gets wrong that both score (the split halves' rule)."""
    scores = []
    for masks, units in (first, second):
        correct = units > 0
        plain = estimator.memorization_scores(masks, correct, reliability.HALF_MIN_COUNT)
        sums = margins.MarginSums.of(units[None], masks, np.ones(len(masks), bool))
        margin = margins.memorization_margin(masks.sum(0), (~masks).sum(0), sums)
        scores.append((plain["memorization"], margin["memorization_margin"][0],
                       ~correct.all(axis=0)))
    (plain_a, margin_a, hard_a), (plain_b, margin_b, hard_b) = scores
    rows = (hard_a | hard_b) & np.isfinite(plain_a) & np.isfinite(plain_b)
    return (spearmanr(plain_a[rows], plain_b[rows])[0],
            spearmanr(margin_a[rows], margin_b[rows])[0])


def test_split_halves_predict_the_agreement_of_two_independent_runs():
    """Simulated margins of known distributions: two runs of 48 models on the same examples
    (other subsets, other draws) agree as well as each run's split halves predict, within
    0.05, for both estimators; the margin estimate is the more reliable, and its record says
    how many plain models that is worth."""
    num_models = 48
    runs = [simulated_margins(2 * num_models, seed=5, num_examples=2000)[:2]]
    masks, units = runs[0]
    first, second = (masks[:num_models], units[:num_models]), (masks[num_models:],
                                                               units[num_models:])
    plain_pair, margin_pair = independent_agreement(first, second)
    record = reliability.split_half(*first[:1], first[1] > 0, first[1], seed=0)
    assert record["num_models"] == num_models and record["splits"] == reliability.SPLITS
    assert abs(record["plain"]["reliability"] - plain_pair) < 0.05
    assert abs(record["margin"]["reliability"] - margin_pair) < 0.05
    assert record["margin"]["reliability"] > record["plain"]["reliability"]
    assert record["margin"]["plain_models_for_same"] > num_models
    json.dumps(record, allow_nan=False)  # JSON-ready: no NaN or infinity
    assert "these 48 models score like about" in reliability.describe(record)


def test_too_few_models_or_nothing_contested_is_said_not_measured():
    masks, units, _ = simulated_margins(3, seed=1, num_examples=50)
    record = reliability.split_half(masks, units > 0, units, seed=0)
    assert record["plain"] is None and record["margin"] is None
    assert reliability.describe(record).startswith("not measured (3 models")
    everyone_right = np.abs(units) + 1
    record = reliability.split_half(masks, everyone_right > 0, everyone_right, seed=0)
    assert record["contested_examples"] == 0 and record["plain"] is None


def test_convergence_scores_the_first_k_models_of_one_half_against_the_other():
    masks, units, _ = simulated_margins(64, seed=2, num_examples=1500)
    curve = reliability.convergence(masks, units > 0, units, seed=0)
    assert curve["models"] == [4, 8, 16, 32] and curve["reference_models"] == 32
    assert all(m > p for m, p in zip(curve["margin"][1:], curve["plain"][1:], strict=True))
    assert curve["plain"][-1] > curve["plain"][0]
    without = reliability.convergence(masks, units > 0, None, seed=0)
    assert without["margin"] == [None] * 4 and without["plain"] == curve["plain"]
