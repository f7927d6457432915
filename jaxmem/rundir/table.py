"""A run's table: one row per training example, as named columns (written as CSV by
`python -m jaxmem.export`, as a DataFrame by `Run.to_frame()`; the columns are described in
jaxmem/export.py)."""

from __future__ import annotations

import numpy as np

from jaxmem import estimator


def table_columns(run) -> dict[str, np.ndarray]:
    """The table's columns of a loaded `Run`, name -> [N] array (see jaxmem/export.py)."""
    num = len(run.labels)
    masks, correct = np.asarray(run.masks, bool), np.asarray(run.correct_train, bool)
    in_correct, out_correct = estimator.correct_counts(masks, correct)
    original_label = np.asarray(run.labels).copy()
    original_label[run.canary_index] = run.canary_original_label
    fdr_set = run.extra.get("memorized_fdr", np.zeros(num, bool))
    names = {"file_name": np.asarray(run.extra["file_names"])} if "file_names" in run.extra else {}
    with np.errstate(invalid="ignore", divide="ignore"):
        in_acc, out_acc = in_correct / run.in_count, out_correct / run.out_count
    rank = np.zeros(num, np.int64)  # 0: a canary, not ranked
    rank[run.ranking()] = np.arange(1, int(run.real.sum()) + 1)
    return {
        "index": np.arange(num),
        **names,
        "original_index": np.asarray(run.original_index),
        "label": np.asarray(run.labels),
        "original_label": original_label,
        "canary": ~run.real,
        "suggested_label": np.asarray(run.suggested_label),
        "suggested_label_share": np.asarray(run.suggested_label_share),
        "memorization": np.asarray(run.memorization),
        "memorization_se": np.asarray(run.memorization_se),
        "memorization_margin": np.asarray(run.memorization_margin),
        "memorization_margin_se": np.asarray(run.memorization_margin_se),
        "rank": rank,
        "threshold_pvalue": np.asarray(run.threshold_pvalue_by_epoch[-1]),
        "memorized_fdr": np.asarray(fdr_set, bool),
        "in_subset_acc": np.where(run.in_count > 0, in_acc, np.nan),
        "consistency_score": np.where(run.out_count > 0, out_acc, np.nan),
        "in_count": np.asarray(run.in_count),
        "out_count": np.asarray(run.out_count),
        "low_count": np.asarray(run.low_count, bool),
    }
