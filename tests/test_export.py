"""The run's table (jaxmem/export.py): one row per training example, as CSV and DataFrame."""

import csv
import dataclasses
import os
import sys

import numpy as np
import pytest

from jaxmem import cli, estimator, export, load_run
from jaxmem.errors import UserError
from jaxmem.rundir.table import table_columns


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def as_float(cells):
    return np.array([float(c) if c else np.nan for c in cells])


def test_the_table_holds_each_examples_scores_suggestion_and_accuracies(fake_run_dir, capsys):
    path = fake_run_dir(num_train=120, num_test=30, dataset="synthetic", num_models=12,
                        diverged=(3,))
    run = load_run(path)
    assert export.main([path]) == 0
    assert "wrote 120 rows" in capsys.readouterr().out
    header, rows = read_csv(os.path.join(path, "scores.csv"))
    assert len(rows) == 120 and "file_name" not in header
    column = {name: [row[j] for row in rows] for j, name in enumerate(header)}
    np.testing.assert_array_equal(np.array(column["index"], int), np.arange(120))
    np.testing.assert_array_equal(np.array(column["label"], int), run.labels)
    np.testing.assert_allclose(as_float(column["memorization"]), run.memorization, rtol=1e-7)
    np.testing.assert_array_equal(np.array(column["suggested_label"], int), run.suggested_label)
    # accuracies from first principles: the included models that trained on / held out each
    # example, at the last evaluated epoch (model 3 diverged and is left out)
    masks, correct = np.asarray(run.masks), np.asarray(run.correct_train)
    assert masks.shape[0] == 11
    with np.errstate(invalid="ignore"):  # 0 / 0 where no model held an example out
        in_acc = (masks & correct).sum(0) / masks.sum(0)
        out_acc = (~masks & correct).sum(0) / (~masks).sum(0)
    np.testing.assert_allclose(as_float(column["in_subset_acc"]), in_acc, rtol=1e-7)
    np.testing.assert_allclose(as_float(column["consistency_score"]), out_acc, rtol=1e-7)
    low = np.array(column["low_count"]) == "True"
    np.testing.assert_array_equal(low, run.low_count)
    # NaN cells are empty: the scores of low-count examples
    assert all(column["memorization"][i] == "" for i in np.flatnonzero(low))
    # the fake run's held-out models vote for the label exactly when they are right
    agree = np.array(column["suggested_label"], int) == run.labels
    share = as_float(column["suggested_label_share"])
    np.testing.assert_array_equal(agree[out_acc > 0.5], True)
    np.testing.assert_allclose(share[agree], out_acc[agree], rtol=1e-7)


def test_canaries_keep_their_original_label_and_file_names_come_along(fake_run_dir, tmp_path):
    path = fake_run_dir(num_train=60, num_test=20, dataset="synthetic", num_models=8)
    loaded = load_run(path)
    run = dataclasses.replace(loaded, extra={
        **loaded.extra, "file_names": np.array([f"img_{i:03d}.png" for i in range(60)])})
    changed = dataclasses.replace(run, canary_index=np.array([4, 9]),
                                  canary_original_label=(run.labels[[4, 9]] + 1) % 10)
    columns = table_columns(changed)
    assert list(columns)[:3] == ["index", "file_name", "original_index"]
    assert columns["file_name"][9] == "img_009.png"
    np.testing.assert_array_equal(np.flatnonzero(columns["canary"]), [4, 9])
    np.testing.assert_array_equal(columns["original_label"][[4, 9]], (run.labels[[4, 9]] + 1) % 10)
    np.testing.assert_array_equal(np.delete(columns["original_label"], [4, 9]),
                                  np.delete(run.labels, [4, 9]))
    out = str(tmp_path / "t.csv")
    assert export.write_table(run, out) == out
    assert read_csv(out)[1][9][1] == "img_009.png"


def test_to_frame_gives_the_same_columns_and_needs_pandas_only_there(fake_run_dir, monkeypatch):
    run = load_run(fake_run_dir(num_train=50, num_test=10, dataset="synthetic", num_models=6))
    columns = table_columns(run)
    in_correct, _ = estimator.correct_counts(np.asarray(run.masks), np.asarray(run.correct_train))
    np.testing.assert_array_equal(columns["in_count"] * columns["in_subset_acc"], in_correct)
    pd = pytest.importorskip("pandas")
    frame = run.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(columns)
    np.testing.assert_array_equal(frame["memorization"].to_numpy(), columns["memorization"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(UserError, match="pip install pandas"):
        run.to_frame()


def test_export_refuses_what_is_not_a_run_and_the_summary_names_the_table(
        fake_run_dir, tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    path = fake_run_dir(num_train=40, num_test=10, dataset="synthetic", num_models=6)
    assert "python -m jaxmem.export" in cli.table_line(path)
    export.main([path])
    assert cli.table_line(path) == f"table: {path}/scores.csv (one row per training example)"
