"""The paper's statistics, each checked against a direct computation on small hand-made arrays;
figures, galleries, tables and the reproduce script's analysis on fake run directories."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

import jaxmem
from jaxmem.analysis import figures, gallery, influence, stats, tables, transient
from jaxmem.errors import UserError
from jaxmem.estimator import memorization_scores, memorized_count

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_ensemble(seed=0, models=12, examples=9, epochs=3, tests=5):
    rng = np.random.default_rng(seed)
    masks = rng.random((models, examples)) < 0.6
    correct = rng.random((epochs, models, examples)) < np.where(masks, 0.8, 0.4)
    correct_test = rng.random((models, tests)) < 0.5
    return masks, correct, correct_test


def direct_scores(masks, correct, min_count=2):
    """mem(i) by the definition, one example at a time."""
    out = np.full(masks.shape[1], np.nan)
    for i in range(masks.shape[1]):
        inside, outside = correct[masks[:, i], i], correct[~masks[:, i], i]
        if len(inside) >= min_count and len(outside) >= min_count:
            out[i] = inside.mean() - outside.mean()
    return out


# ---- memorized sets and counts ----------------------------------------------------------------

def test_memorized_set_is_strictly_above_threshold_and_skips_nan():
    scores = np.array([0.3, 0.25, np.nan, -0.5, 0.9, 0.2500001])
    assert stats.memorized_set(scores, 0.25).tolist() == [0, 4, 5]
    assert stats.memorized_set(scores, 1.0).tolist() == []


def test_memorized_sets_of_a_run_match_the_stored_scores(fake_run_dir):
    run = jaxmem.load_run(fake_run_dir())
    sets = stats.memorized_sets(run, 0.3)
    assert list(sets) == [int(e) for e in run.epochs]
    for row, indices in zip(run.memorization_by_epoch, sets.values(), strict=True):
        expected = [i for i, v in enumerate(row) if not math.isnan(v) and v > 0.3]
        assert indices.tolist() == expected
    assert stats.stored_counts(run, 0.3).tolist() == [len(s) for s in sets.values()]


@pytest.mark.parametrize("block_bytes", [stats.BLOCK_BYTES, 4 * 12 * 2])  # one block / 2 columns
def test_resampled_counts_equal_recomputing_each_resampled_ensemble(monkeypatch, block_bytes):
    monkeypatch.setattr(stats, "BLOCK_BYTES", block_bytes)
    masks, correct, _ = random_ensemble()
    indices = stats.bootstrap_indices(12, num_resamples=25, seed=3)
    got = stats.resampled_counts(masks, correct, indices, threshold=0.2, min_count=2)
    assert got.shape == (25, 3)
    for r, idx in enumerate(indices):
        resampled = memorization_scores(masks[idx], correct[:, idx], min_count=2)
        assert got[r].tolist() == memorized_count(resampled["memorization"], 0.2).tolist()
        direct = [np.sum(np.nan_to_num(direct_scores(masks[idx], c[idx]), nan=-1) > 0.2)
                  for c in correct]
        assert got[r].tolist() == direct
    single = stats.resampled_counts(masks, correct[-1], indices, 0.2, 2)
    assert single.tolist() == got[:, -1].tolist()


def test_bootstrap_interval_is_the_percentile_of_the_resampled_counts():
    masks, correct, _ = random_ensemble(seed=1, models=20, examples=30)
    result = stats.bootstrap_counts(masks, correct, [2, 4, 6], threshold=0.2, min_count=2,
                                    num_resamples=50, confidence=0.9, seed=7)
    full = memorization_scores(masks, correct, 2)["memorization"]
    assert result.count.tolist() == memorized_count(full, 0.2).tolist()
    assert result.epochs.tolist() == [2, 4, 6]
    np.testing.assert_array_equal(result.ci_low, np.percentile(result.samples, 5, axis=0))
    np.testing.assert_array_equal(result.ci_high, np.percentile(result.samples, 95, axis=0))
    np.testing.assert_array_equal(
        result.samples, stats.resampled_counts(masks, correct,
                                               stats.bootstrap_indices(20, 50, 7), 0.2, 2))
    # resampling every model exactly once reproduces the full ensemble's count
    same = stats.bootstrap_counts(masks, correct, threshold=0.2, min_count=2,
                                  indices=np.tile(np.arange(20), (4, 1)))
    assert (same.samples == same.count).all() and same.ci_low.tolist() == same.count.tolist()
    record = result.as_dict()
    assert record["num_resamples"] == 50 and json.dumps(record)
    with pytest.raises(UserError):
        stats.bootstrap_counts(masks, correct, [1, 2], num_resamples=2)


def test_memorized_counts_of_a_run_agree_with_its_stored_scores(fake_run_dir):
    run = jaxmem.load_run(fake_run_dir())
    result = stats.memorized_counts(run, num_resamples=20)
    assert result.count.tolist() == stats.stored_counts(run).tolist()
    assert result.count.tolist() == [int(c) for c in memorized_count(
        run.memorization_by_epoch, 0.25)]
    assert (result.ci_low <= result.ci_high).all()
    for split in ("train", "test"):  # one epoch unpacked at a time, same arrays
        packed = run.correct_epochs(split)
        full = run.correct_by_epoch(split)
        assert len(packed) == len(full)
        assert all((packed[e] == full[e]).all() for e in range(len(full)))
        assert all((a == b).all() for a, b in zip(packed[1:], full[1:], strict=True))
    direct = stats.bootstrap_counts(run.masks, run.correct_by_epoch("train"), num_resamples=20)
    np.testing.assert_array_equal(direct.samples, result.samples)
    no_ci = stats.memorized_counts(run, num_resamples=0)
    assert np.isnan(no_ci.ci_low).all() and no_ci.count.tolist() == result.count.tolist()


# ---- stages, correlation, families ---------------------------------------------------------------

def test_stages_locate_onset_peak_and_decline():
    epochs = [1, 2, 3, 4, 5, 6, 7]
    result = stats.memorization_stages(epochs, [0, 0, 1, 5, 10, 8, 6])
    assert (result["onset_epoch"], result["peak_epoch"], result["final_epoch"]) == (3, 5, 7)
    assert (result["peak_count"], result["final_count"], result["decline"]) == (10, 6, 4)
    assert result["decline_fraction"] == 0.4
    assert result["stage"] == ["none", "none", "rise", "rise", "rise", "decline", "decline"]
    # onset needs onset_fraction of the peak; ties at the peak take the first
    late = stats.memorization_stages(epochs, [1, 1, 2, 30, 40, 40, 40], onset_fraction=0.5)
    assert (late["onset_epoch"], late["peak_epoch"], late["decline"]) == (4, 5, 0)
    assert late["stage"][-1] == "decline"
    empty = stats.memorization_stages([2, 4], [0, 0])
    assert empty["onset_epoch"] is None and empty["peak_epoch"] is None
    assert empty["stage"] == ["none", "none"]
    with pytest.raises(UserError):
        stats.memorization_stages([1, 2], [1])


def test_pearson_matches_the_textbook_formula():
    x = np.array([0.1, 0.25, 0.3, 0.5, 0.55, 0.8])
    y = np.array([3.0, 10.0, 8.0, 20.0, 19.0, 31.0])
    r, p = stats.pearson(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    r_direct = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    t = r_direct * math.sqrt((len(x) - 2) / (1 - r_direct ** 2))
    assert r == pytest.approx(r_direct, abs=1e-12)
    assert p == pytest.approx(2 * scipy_stats.t.sf(abs(t), len(x) - 2), rel=1e-9)
    assert stats.pearson(np.append(x, np.nan), np.append(y, 5.0)) == (r, p)
    assert all(math.isnan(v) for v in stats.pearson([1, 2, 3], [5, 5, 5]))
    assert all(math.isnan(v) for v in stats.pearson([1], [2]))


def test_gap_correlation_over_runs(fake_run_dir):
    runs = [jaxmem.load_run(fake_run_dir(f"r{s}", seed=s, strength=0.4 + 0.3 * s))
            for s in range(3)]
    result = stats.gap_correlation(runs)
    gaps = [float(r.train_acc[-1].mean() - r.test_acc[-1].mean())
            for r in runs]
    assert result["gap"] == gaps
    assert result["memorized_count"] == [r.metrics["memorized_count"] for r in runs]
    assert (result["pearson_r"], result["p_value"]) == stats.pearson(
        gaps, result["memorized_count"])


def test_family_and_size_series(fake_run_dir):
    assert [stats.family(a) for a in ("small_vgg", "vgg19", "resnet50", "vit_tiny",
                                      "tiny_cnn")] == ["vgg", "vgg", "resnet", "vit", "other"]
    runs = [jaxmem.load_run(fake_run_dir(arch, arch=arch, num_params=params, seed=i))
            for i, (arch, params) in enumerate([("med_vgg", 900), ("tiny_cnn", 50),
                                                ("small_vgg", 400)])]
    assert stats.run_label(runs[0]) == "digits/med_vgg"
    seeded = jaxmem.load_run(fake_run_dir("seeded", config_seed=3))
    assert stats.run_label(seeded) == "digits/tiny_cnn-s3"
    assert stats.for_run({seeded.path: 1, "digits/med_vgg": 2}, seeded) == 1
    assert stats.for_run({seeded.path: 1, "digits/med_vgg": 2}, runs[0]) == 2
    assert stats.for_run(None, runs[0]) is None
    series = stats.size_series(runs)
    assert list(series) == [("digits", "other"), ("digits", "vgg")]
    assert series[("digits", "vgg")]["arch"] == ["small_vgg", "med_vgg"]
    assert series[("digits", "vgg")]["num_params"] == [400, 900]
    assert series[("digits", "vgg")]["memorized_count"] == [
        runs[2].metrics["memorized_count"], runs[0].metrics["memorized_count"]]


# ---- transient memorization ----------------------------------------------------------------------

def test_transient_set_by_hand():
    source = np.array([0.9, 0.5, 0.3, 0.1, 0.8, np.nan, 0.6])
    target = np.array([0.1, 0.6, 0.2, 0.0, np.nan, 0.0, 0.25])
    result = transient.transient_set(source, target, 0.25, "A", "B")
    assert result.indices.tolist() == [0, 2, 6]
    assert result.count == 3 and result.compared == 5
    assert result.source_mean == np.mean([0.9, 0.3, 0.6])
    assert result.source_std == np.std([0.9, 0.3, 0.6])
    assert result.target_mean == np.mean([0.1, 0.2, 0.25])
    assert result.target_std == np.std([0.1, 0.2, 0.25])
    assert "3 examples memorized by A, not by B" in result.describe()
    none = transient.transient_set(source, source, 0.25)
    assert none.count == 0 and math.isnan(none.source_mean)
    assert json.dumps(none.as_dict())


def test_modelwise_and_epochwise_transient_on_runs(fake_run_dir):
    small = jaxmem.load_run(fake_run_dir("small", arch="small_vgg", seed=1, strength=0.7))
    large = jaxmem.load_run(fake_run_dir("large", arch="med_vgg", seed=2))
    result = transient.modelwise(small, large)
    a, b = small.memorization, large.memorization
    expected = [i for i in range(len(a)) if np.isfinite(a[i]) and np.isfinite(b[i])
                and a[i] > 0.25 and b[i] <= 0.25]
    assert result.indices.tolist() == expected and result.count > 0
    assert (result.source, result.target) == ("digits/small_vgg", "digits/med_vgg")
    assert result.source_mean == np.mean(a[expected])

    stages = stats.run_stages(large)
    epochwise = transient.epochwise(large)
    peak, last = large.scores_at(stages["peak_epoch"]), large.memorization
    expected = [i for i in range(len(peak)) if np.isfinite(peak[i]) and np.isfinite(last[i])
                and peak[i] > 0.25 and last[i] <= 0.25]
    assert epochwise.indices.tolist() == expected and epochwise.count > 0
    assert epochwise.source == f"epoch {stages['peak_epoch']}"
    assert transient.epochwise(large, peak_epoch=6).count == 0  # the last epoch itself

    other = jaxmem.load_run(fake_run_dir("other", dataset="synthetic", num_train=len(a)))
    with pytest.raises(UserError, match="same training set"):
        transient.modelwise(small, other)


# ---- influence -----------------------------------------------------------------------------------

def direct_influence(masks, correct_test, min_count=2):
    out = np.full((masks.shape[1], correct_test.shape[1]), np.nan)
    for i in range(masks.shape[1]):
        if masks[:, i].sum() < min_count or (~masks[:, i]).sum() < min_count:
            continue
        for j in range(correct_test.shape[1]):
            out[i, j] = (correct_test[masks[:, i], j].mean()
                         - correct_test[~masks[:, i], j].mean())
    return out


def test_influence_is_exactly_the_difference_of_means(tmp_path):
    masks, _, correct_test = random_ensemble(seed=4, models=15, examples=11, tests=7)
    masks[:, 3] = True  # never held out: NaN row
    masks[:2, 5], masks[2:, 5] = True, False  # only 2 in-models
    expected = direct_influence(masks, correct_test, min_count=3)
    for block in (1, 4, 100):
        got = influence.influence(masks, correct_test, block_size=block, dtype=np.float64,
                                  min_count=3)
        np.testing.assert_array_equal(got, expected)
    assert np.isnan(expected[3]).all() and np.isnan(expected[5]).all()
    rows = np.array([7, 0, 2])
    np.testing.assert_array_equal(
        influence.influence(masks, correct_test, rows, dtype=np.float64, min_count=3),
        expected[rows])
    path = str(tmp_path / "infl.npy")
    mapped = influence.influence(masks, correct_test, block_size=3, out=path, min_count=3)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    np.testing.assert_array_equal(np.load(path), expected.astype(np.float32))
    with pytest.raises(UserError):
        influence.influence(masks, correct_test[:3])


def test_high_influence_pairs_by_enumeration():
    rng = np.random.default_rng(0)
    infl = rng.uniform(-0.5, 0.5, (8, 6))
    infl[2, 1] = np.nan
    memorization = np.array([0.3, 0.1, 0.9, np.nan, 0.5, 0.26, 0.25, 0.8])
    got = influence.high_influence_pairs(infl, memorization)
    expected = sorted(((infl[i, j], i, j) for i in range(8) for j in range(6)
                       if memorization[i] > 0.25 and infl[i, j] > 0.15),
                      key=lambda t: (-t[0], t[1], t[2]))
    assert list(zip(got.influence, got.train_index, got.test_index, strict=True)) == expected
    assert got.memorization.tolist() == [memorization[i] for _, i, _ in expected]
    rows = np.array([4, 7])
    subset = influence.high_influence_pairs(infl[rows], memorization, rows=rows)
    assert set(subset.train_index.tolist()) <= {4, 7}
    assert len(subset) == sum(1 for _, i, _ in expected if i in (4, 7))
    assert len(influence.high_influence_pairs(infl, np.zeros(8))) == 0
    assert got.as_records(2)[0]["train_index"] == expected[0][1]


def test_run_high_influence_pairs_find_the_planted_pairs(fake_run_dir):
    run = jaxmem.load_run(fake_run_dir(influence_pairs=3))
    pairs = influence.run_high_influence_pairs(run)
    full = influence.run_influence(run)
    np.testing.assert_array_equal(
        influence.high_influence_pairs(full, run.memorization).test_index, pairs.test_index)
    found = set(zip(pairs.train_index.tolist(), pairs.test_index.tolist(), strict=True))
    for j in range(3):  # planted: test example j is correct exactly when its partner is in S_k
        partners = [i for i in range(run.masks.shape[1])
                    if (run.masks[:, i] == run.correct_test[:, j]).all()]
        assert any((i, j) in found for i in partners)
    assert (pairs.influence > 0.15).all() and (pairs.memorization > 0.25).all()
    np.testing.assert_array_equal(influence.run_influence(run, epoch=6), full)


# ---- tables, figures, galleries ------------------------------------------------------------------

def test_markdown_table_and_table1(fake_run_dir):
    assert tables.markdown_table(["a", "b"], [[1, "x|y"], [2.5, ""]]) == (
        "| a | b |\n|---|---|\n| 1 | x\\|y |\n| 2.5 |  |\n")
    assert [tables.format_params(n) for n in (999, 12_345, 490_000, 20_040_000)] == [
        "999", "12.3K", "0.49M", "20.04M"]
    runs = [jaxmem.load_run(fake_run_dir("b", arch="small_vgg", num_params=490_000, seed=1)),
            jaxmem.load_run(fake_run_dir("a", arch="tiny_cnn", num_params=12_345))]
    rows = tables.table1_rows(runs)
    assert [r["arch"] for r in rows] == ["tiny_cnn", "small_vgg"]  # by size
    run = runs[1]
    assert rows[0]["train_acc"] == np.mean(run.train_acc[-1])
    assert rows[0]["test_acc"] == np.mean(run.test_acc[-1])
    assert rows[0]["memorized"] == run.metrics["memorized_count"]
    text = tables.table1(runs)
    lines = text.splitlines()
    assert lines[0].startswith("| Run | Parameters |") and len(lines) == 4
    assert lines[2].startswith(f"| digits/tiny_cnn | 12.3K | 16 | {100 * rows[0]['train_acc']:.1f}")


def test_paper_summary_and_markdown(fake_run_dir):
    runs = [jaxmem.load_run(fake_run_dir(arch, arch=arch, num_params=p, seed=i, strength=s))
            for i, (arch, p, s) in enumerate([("tiny_cnn", 10, 0.5), ("small_vgg", 400, 0.8),
                                              ("med_vgg", 900, 1.0)])]
    pairs = tables.modelwise_pairs(runs)
    assert [(stats.run_label(a), stats.run_label(b)) for a, b in pairs] == [
        ("digits/small_vgg", "digits/med_vgg")]
    summary = tables.paper_summary(runs)
    json.dumps(summary)
    assert summary["threshold"] == 0.25
    assert [r["label"] for r in summary["runs"]] == [
        "digits/tiny_cnn", "digits/small_vgg", "digits/med_vgg"]
    corr = stats.gap_correlation(tables.sorted_runs(runs))
    assert summary["gap_correlation"]["pearson_r"] == corr["pearson_r"]
    assert summary["transient"]["modelwise"][0]["count"] == transient.modelwise(
        runs[1], runs[2]).count
    assert summary["runs"][2]["stages"] == stats.run_stages(runs[2])
    text = tables.summary_markdown(summary)
    assert "Pearson r = " in text and "digits/small_vgg" in text and "Epoch-wise" in text
    # two runs of different families on one dataset: neighbours in size are paired
    assert len(tables.modelwise_pairs(runs[:2])) == 1


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_figures_are_written(fake_run_dir, tmp_path):
    runs = [jaxmem.load_run(fake_run_dir(arch, arch=arch, num_params=p, seed=i, strength=s))
            for i, (arch, p, s) in enumerate([("tiny_cnn", 10, 0.5), ("small_vgg", 400, 0.8),
                                              ("med_vgg", 900, 1.0)])]
    counts = {stats.run_label(r): stats.memorized_counts(r, num_resamples=10) for r in runs}
    paths = {name: str(tmp_path / "figs" / f"{name}.png") for name in (
        "size", "curve", "curve1", "gap", "hist", "runs", "epochs")}
    figures.memorization_vs_size(runs, path=paths["size"])
    figures.memorization_curve(runs, counts=counts, path=paths["curve"])
    figures.memorization_curve(runs[0], num_resamples=5, path=paths["curve1"])
    fig = figures.memorization_vs_gap(runs, path=paths["gap"])
    assert f"r = {stats.gap_correlation(runs)['pearson_r']:.3f}" in fig.axes[0].get_title()
    figures.score_histograms({"a": runs[0].memorization}, path=paths["hist"])
    figures.run_score_histograms(runs, path=paths["runs"])
    fig = figures.epoch_score_histograms(runs[0], path=paths["epochs"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "epoch 2", "epoch 4", "epoch 6"]
    assert all(_is_png(p) for p in paths.values())
    assert figures.to_png(fig).startswith(PNG_MAGIC)


def test_galleries(fake_run_dir, tmp_path):
    run = jaxmem.load_run(fake_run_dir())
    dataset = gallery.load_dataset(run)
    top = gallery.top_per_class(run.memorization, dataset.y_train, 3, [0, 7])
    for cls, indices in top.items():
        members = [i for i in range(len(dataset.y_train)) if dataset.y_train[i] == cls
                   and np.isfinite(run.memorization[i])]
        best = sorted(members, key=lambda i: (-run.memorization[i], i))[:3]
        assert indices.tolist() == best
    path = str(tmp_path / "gallery.png")
    fig = gallery.most_memorized_gallery(run, dataset, per_class=4, max_classes=3, path=path)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert _is_png(path) and len(texts) == 3 * 4 + 3  # cell titles and row labels
    first = int(top[0][0])  # classes 0, 1, 2 all reach the top score: the first three shown
    suggested = (f"held-out: {run.suggested_label[first]} "
                 f"{100 * run.suggested_label_share[first]:.0f}%")
    assert texts[0] == f"#{first} {run.memorization[first]:.2f}\n{suggested}"
    assert texts[-3:] == ["class 0", "class 1", "class 2"]
    pairs = influence.run_high_influence_pairs(run)
    fig = gallery.influence_gallery(run, pairs, dataset, max_pairs=5,
                                    path=str(tmp_path / "pairs.png"))
    texts = [t.get_text() for t in fig.axes[0].texts]
    i, j = int(pairs.train_index[0]), int(pairs.test_index[0])
    assert texts[0].startswith(f"train #{i} ") and texts[5].startswith(f"test #{j} ")
    assert len(texts) == 2 * 5 + 2 and _is_png(str(tmp_path / "pairs.png"))
    empty = influence.high_influence_pairs(np.zeros((0, 3)), run.memorization, rows=[])
    gallery.influence_gallery(run, empty, dataset, path=str(tmp_path / "none.png"))
    wrong = jaxmem.load_run(fake_run_dir("wrong", num_train=300, num_test=50))
    with pytest.raises(UserError, match="do not match"):
        gallery.load_dataset(wrong)


# ---- the reproduce script's analysis on fake runs ------------------------------------------------

def load_reproduce():
    path = os.path.join(REPO, "experiments", "paper", "reproduce.py")
    spec = importlib.util.spec_from_file_location("reproduce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_quick_analysis_on_existing_runs(tmp_path, capsys):
    from conftest import write_fake_run

    reproduce = load_reproduce()
    out = str(tmp_path / "paper")
    grid = reproduce.grid(quick=True)
    assert ("digits", "small_vgg") in grid and len(grid) >= 3
    for i, (dataset, arch) in enumerate(grid):
        write_fake_run(reproduce.run_dir(out, dataset, arch), arch=arch, seed=i,
                       num_params=1000 * 10 ** i, strength=0.5 + 0.25 * i)
    assert reproduce.main(["--quick", "--skip-training", "--no-report", "--bootstrap", "10",
                           f"--out={out}"]) == 0
    for name in ("fig1_memorization_vs_size.png", "fig2_memorization_vs_epoch_digits.png",
                 "fig3_memorization_vs_gap.png", "fig4_scores_by_run_digits.png",
                 "fig4_scores_by_epoch_digits-small_vgg.png"):
        assert _is_png(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert len(summary["runs"]) == len(grid)
    assert summary["runs"][0]["counts_by_epoch"]["num_resamples"] == 10
    assert {"pearson_r", "p_value"} <= set(summary["gap_correlation"])
    assert {"modelwise", "epochwise"} == set(summary["transient"])
    with open(os.path.join(out, "table1.md")) as f:
        assert f.read().count("| digits/") == len(grid)
    assert os.path.exists(os.path.join(out, "summary.md"))
    assert "Pearson r" in capsys.readouterr().out
    # nothing to analyse: one-line error, exit 2
    assert reproduce.main(["--quick", "--skip-training", f"--out={tmp_path / 'empty'}"]) == 2
    assert "no complete run directories" in capsys.readouterr().err


def test_models_excluded_from_a_run_are_excluded_from_every_analysis(fake_run_dir):
    """A run whose models 0-3 diverged (excluded by --drop-diverged): bootstrap counts,
    influence, the train-test gap and Table 1 use the included models only, as the stored
    scores do."""
    from jaxmem import estimator

    path = fake_run_dir("dropped", num_models=24, diverged=(0, 1, 2, 3))
    run = jaxmem.load_run(path)
    everything = jaxmem.load_run(path, all_models=True)
    keep = np.arange(4, 24)
    assert list(run.excluded_models) == [0, 1, 2, 3] and list(run.model_indices) == list(keep)
    np.testing.assert_array_equal(run.masks, np.asarray(everything.masks)[keep])
    counts = stats.memorized_counts(run, num_resamples=5)
    assert counts.count[-1] == run.metrics["memorized_count"]
    all_models = estimator.memorization_scores(everything.masks, everything.correct_train)
    assert estimator.memorized_count(all_models["memorization"]) != counts.count[-1]
    np.testing.assert_array_equal(
        influence.run_influence(run, rows=np.arange(10)),
        influence.influence(np.asarray(everything.masks)[keep],
                            np.asarray(everything.correct_test)[keep], np.arange(10)))
    row = tables.table1_rows([run])[0]
    assert row["num_models"] == 20
    assert row["train_acc"] == pytest.approx(everything.train_acc[-1][keep].mean())
    assert stats.train_test_gap(run) == pytest.approx(
        everything.train_acc[-1][keep].mean() - everything.test_acc[-1][keep].mean())


def test_stages_are_located_on_the_counts_above_the_noise_floor():
    rise_and_fall = [3, 40, 120, 60, 30]
    stages = stats.memorization_stages([1, 2, 3, 4, 5], rise_and_fall, floor=[50] * 5)
    assert (stages["onset_epoch"], stages["peak_epoch"]) == (3, 3)  # only epochs 3, 4 exceed
    assert stages["peak_count"] == 70 and stages["final_count"] == 0
    assert stages["stage"] == ["none", "none", "rise", "decline", "decline"]
    within_noise = stats.memorization_stages([1, 2, 3, 4, 5], rise_and_fall, floor=[130] * 5)
    assert within_noise["peak_epoch"] is None and set(within_noise["stage"]) == {"none"}


def test_table1_and_summary_state_every_count_with_its_noise_floor(fake_run_dir):
    run = jaxmem.load_run(fake_run_dir("floor", num_models=24))
    row = tables.table1_rows([run])[0]
    stored = run.extra["null_samples_by_epoch"][:, -1]
    assert row["noise_mean"] == pytest.approx(stored.mean())
    assert row["noise_p95"] == pytest.approx(np.percentile(stored, 95))
    assert row["memorized_fdr"] <= row["memorized"]
    assert "Noise mean (95th pct)" in tables.table1([run])
    summary = tables.paper_summary([run])
    assert summary["runs"][0]["noise_floor_by_epoch"]["observed"][-1] == row["memorized"]
    assert "Counts and their noise floor" in tables.summary_markdown(summary)
