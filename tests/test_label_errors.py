"""experiments/benchmarks/label_errors.py: its data, folds and rankings (the measurement itself is
in BENCHMARKS.md; cleanlab comes with the dev extra, not with jaxmem, so its part is skipped
where only jaxmem is installed)."""

import numpy as np
import pytest
from test_benchmarks import load_script  # pytest puts tests/ on sys.path


@pytest.fixture(scope="module")
def script():
    return load_script("label_errors")


def test_the_subset_changes_exactly_the_chosen_labels_to_other_classes(script):
    rng = np.random.default_rng(1)
    source = {"x_train": rng.integers(0, 256, (300, 6, 6), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 300).astype(np.uint8),
              "x_test": rng.integers(0, 256, (50, 6, 6), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 50).astype(np.uint8)}
    arrays = script.build_subset(source, 120, 20, 9, seed=3)
    changed = arrays["changed_index"]
    assert arrays["x_train"].shape == (120, 6, 6, 1) and arrays["x_test"].shape == (20, 6, 6, 1)
    # the images say which source rows were drawn; only the changed rows' labels differ
    rows = [int(np.flatnonzero((source["x_train"] == x[..., 0]).all((1, 2)))[0])
            for x in arrays["x_train"]]
    differ = np.flatnonzero(arrays["y_train"] != source["y_train"][rows])
    np.testing.assert_array_equal(differ, changed)
    assert len(changed) == 9
    again = script.build_subset(source, 120, 20, 9, seed=3)
    np.testing.assert_array_equal(again["changed_index"], changed)
    np.testing.assert_array_equal(arrays["original_label"], source["y_train"][rows][changed])
    np.testing.assert_array_equal(again["y_train"], arrays["y_train"])


def test_folds_hold_each_example_out_exactly_once(script):
    masks = script.fold_masks(103, 5, seed=0)
    assert masks.shape == (5, 103)
    np.testing.assert_array_equal((~masks).sum(0), 1)
    assert set((~masks).sum(1).tolist()) == {20, 21}


def test_rankings_and_their_precision_and_recall(script):
    changed = np.array([2, 5, 7])
    hits = script.top_k_hits(np.array([5, 0, 7, 2]), changed, 3)
    assert hits == {"found": 2, "ranked": 3, "precision": 2 / 3, "recall": 2 / 3}
    assert script.top_k_hits(np.array([7]), changed, 3)["precision"] == 1.0  # fewer than k
    labels = np.array([0, 1, 2, 3, 4])
    suggested = np.array([0, 2, -1, 1, 3])
    share = np.array([1.0, 0.6, np.nan, 0.9, 0.6])
    probs = np.full((5, 5), 0.2)
    probs[1, 1], probs[4, 4] = 0.3, 0.1  # equal shares: the less likely given label first
    np.testing.assert_array_equal(script.rank_by_suggestion(labels, suggested, share, probs),
                                  [3, 4, 1])
    probs, unheld = script.out_of_sample_probs(np.array([[1.0, 3.0], [0.0, 0.0]]),
                                               np.array([[1, 3], [0, 0]]))
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.5, 0.5]])
    assert unheld == 1


def test_without_cleanlab_the_script_stops_before_training(script, monkeypatch, capsys):
    monkeypatch.setattr(script.importlib.util, "find_spec", lambda name: None)
    assert script.main(["--out", "/nonexistent/never-written"]) == 2
    assert "pip install cleanlab" in capsys.readouterr().err


def test_cleanlab_flags_confidently_other_labels_first(script):
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    probs = np.full((200, 4), 0.02)
    probs[np.arange(200), labels] = 0.94
    probs += rng.uniform(0, 0.01, probs.shape)
    wrong = np.array([3, 60, 120, 170])
    probs[wrong] = 0.02
    probs[wrong, (labels[wrong] + 1) % 4] = 0.94
    probs /= probs.sum(1, keepdims=True)
    ranked = script.cleanlab_ranking(labels, probs)
    np.testing.assert_array_equal(np.sort(ranked[:4]), wrong)


def test_planted_scores_reports_what_the_run_says_of_the_changed_labels(fake_run_dir, tmp_path,
                                                                      capsys):
    from scipy.stats import mannwhitneyu

    import jaxmem

    script = load_script("planted_scores")
    run = jaxmem.load_run(fake_run_dir())
    scores = run.memorization
    changed = np.sort(np.random.default_rng(0).choice(
        np.flatnonzero(~np.isnan(scores)), 12, replace=False))
    original = run.suggested_label[changed].copy()
    original[:5] = (original[:5] + 1) % 10  # 7 of 12 agree with the suggested label
    planted = tmp_path / "planted.npz"
    np.savez(planted, changed_index=changed, original_label=original)
    script.main([run.path, str(planted)])
    out = capsys.readouterr().out
    rest = np.setdiff1d(np.flatnonzero(~np.isnan(scores)), changed)
    nan_count = int(np.isnan(scores).sum())  # NaN scores rank lowest: below every changed one
    u = mannwhitneyu(scores[changed], scores[rest]).statistic + len(changed) * nan_count
    assert f"AUC {u / (len(changed) * (len(rest) + nan_count)):.3f}," in out
    assert f"{int((scores[changed] > 0.25).sum())} of 12 above 0.25" in out
    at_fdr = run.memorized(0.25, fdr=run.metrics["fdr"])
    assert (f"{len(at_fdr)} examples, {len(np.intersect1d(at_fdr, changed))} of them changed "
            "labels") in out
    assert "= the original label for 7 of 12" in out
    real = np.flatnonzero(run.real)
    top = {name: np.intersect1d(real[np.argsort(-np.nan_to_num(values[real], nan=-np.inf),
                                                kind="stable")][:12], changed).size
           for name, values in (("plain", scores), ("margin", run.memorization_margin))}
    ranked = np.intersect1d(run.most_memorized(12), changed).size
    assert (f"in the top 12: by the plain score alone (ties in index order) {top['plain']}, by "
            f"the margin estimate alone {top['margin']} (AUC ") in out
    assert f"by the run's ranking (plain, ties by the margin estimate) {ranked};" in out
