"""A run's scores as a table: one row per training example.

    python -m jaxmem.export RUN [--out RUN/scores.csv]

or, with pandas installed (not a dependency of jaxmem), `jaxmem.load_run(RUN).to_frame()`.

Columns (in this order; NaN where a value is undefined):
    index                 position in the training set as trained (the run's arrays' index)
    file_name             the image's file name (only for datasets that record file names)
    original_index        position in the dataset's own training split
    label                 the label trained on (a canary's changed label)
    original_label        the dataset's label (differs from `label` only for canaries)
    canary                planted label change (reported apart, never counted)
    suggested_label       majority class of the models that held the example out (-1: none)
    suggested_label_share its share of their votes
    memorization          score at the last evaluated epoch (in-subset minus held-out acc.)
    memorization_se       its standard error
    memorization_margin   the model-based estimate of the same score from the models' margins
                          (jaxmem/margins.py), memorization_margin_se its standard error
    rank                  1 = the most memorized real example (by score, equal scores by the
                          margin estimate: `Run.ranking`); 0 for canaries
    threshold_pvalue      p-value of H0: score <= the run's threshold (score test)
    memorized_fdr         score above the threshold at the run's false discovery rate
    in_subset_acc         accuracy of the models that trained on the example
    consistency_score     accuracy of the models that held it out: the consistency score
                          (C-score) of Jiang et al. at this run's subset ratio
    in_count, out_count   how many included models trained on / held out the example
    low_count             fewer than --min-count of either: score NaN
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from jaxmem import atomic
from jaxmem.errors import UserError
from jaxmem.rundir import Run, load_run
from jaxmem.rundir.table import table_columns

TABLE_NAME = "scores.csv"


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.8g}"
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    return str(value)


def write_table(run: Run, path: str) -> str:
    """Write the table as CSV (empty cells for NaN) and return its path. The file appears
    whole or not at all (jaxmem/atomic.py): a full disk leaves an older table as it was."""
    columns = table_columns(run)
    rows = zip(*(values.tolist() for values in columns.values()), strict=True)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in rows)
    atomic.write_text(path, table.getvalue())
    return path


def default_table_path(run_dir: str) -> str:
    return os.path.join(run_dir, TABLE_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmem.export",
        description="Write a run's scores as a CSV table, one row per training example.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--out", help=f"CSV file (default: RUN/{TABLE_NAME})")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run)
        path = write_table(run, args.out or default_table_path(args.run))
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(run.labels)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
