"""One self-contained HTML page about one or more run directories.

    python -m jaxmem.report RUN_DIR [RUN_DIR ...] [--out FILE] [--threshold 0.25]

Holds Table 1, the paper's figures (size, training time with noise floors and stages, gap
with Pearson r, score distributions), transient memorization, and per run the most memorized
images and the high-influence train/test pairs. Figures are embedded as base64 PNG, so the file
can be mailed or archived alone. Prints the page's path. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np

from jaxmem import atomic, reliability
from jaxmem.analysis import figures, gallery, influence, stats, tables, transient
from jaxmem.errors import UserError
from jaxmem.rundir import Run, load_run

PAIRS_LISTED = 20
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
.note { color: #777; font-style: italic; }
.warning { color: #a00; font-weight: bold; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def read_runs(run_dirs: Sequence[str]) -> list[Run]:
    """load_run for each directory; any unreadable file becomes a UserError naming the dir."""
    runs = []
    for path in run_dirs:
        if not os.path.isdir(path):
            raise UserError(f"{path} is not a directory")
        try:
            runs.append(load_run(path))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: unreadable run directory ({err})") from None
    if not runs:
        raise UserError("give at least one run directory")
    return runs


def default_output(run_dirs: Sequence[str]) -> str:
    """RUN_DIR/report.html for one run; ./report.html for several."""
    return os.path.join(run_dirs[0], "report.html") if len(run_dirs) == 1 else "report.html"


def build_report(run_dirs: Sequence[str], out: str | None = None, threshold: float | None = None,
                 galleries: bool = True) -> str:
    """Write the HTML report of the runs to `out` (see default_output); returns its path."""
    runs = tables.sorted_runs(read_runs(run_dirs))
    out = os.path.abspath(out or default_output(run_dirs))
    summary = tables.paper_summary(runs, threshold)
    parts = [_header(runs, summary), _overview(runs, threshold, summary)]
    parts += [_run_section(run, threshold, galleries) for run in runs]
    parts.append(_details(summary))
    page = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>jaxmem report</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    with atomic.room_for(out, len(page)):
        atomic.make_folder(os.path.dirname(out))
    atomic.write_text(out, page)  # whole or not at all: a full disk keeps an older page
    return out


def _img(fig, alt: str) -> str:
    data = base64.b64encode(figures.to_png(fig)).decode("ascii")
    return f"<img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{data}'>"


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return format(value, spec)


def _header(runs: list[Run], summary: dict) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    items = "".join(f"<li><b>{html.escape(stats.run_label(r))}</b>: "
                    f"<code>{html.escape(r.path)}</code></li>" for r in runs)
    return (f"<h1>Memorization report</h1><p>{len(runs)} run(s), threshold "
            f"{_fmt(summary['threshold'], 'g')}, written {when}.</p><ul>{items}</ul>")


def _overview(runs: list[Run], threshold, summary: dict) -> str:
    rows = [[r["label"], tables.format_params(r["num_params"]), r["num_models"],
             f"{100 * r['train_acc']:.1f}", f"{100 * r['test_acc']:.1f}",
             f"{100 * r['gap']:.1f}", r["memorized"], tables.noise_cell(r),
             r["memorized_fdr"]] for r in summary["runs"]]
    parts = ["<h2>Table 1: models and accuracy</h2>",
             _table([tables.TABLE1_HEADERS[c] for c in tables.TABLE1_COLUMNS], rows),
             "<p class='note'>Accuracies are means over models at the last evaluated epoch, "
             "in percent; train accuracy is on each model's own subset. Noise: the memorized "
             "count with membership shuffled across models (what noise alone gives); at FDR: "
             "the examples whose score exceeds the threshold at the run's false discovery rate "
             "(Benjamini-Hochberg over each example's test of score &le; threshold: at most "
             "that share of them are expected to score at or below the threshold in truth)."
             "</p>"]
    if len(runs) >= 2:
        corr = summary["gap_correlation"]
        parts += ["<h2>Figure 1: memorization vs model size</h2>",
                  _img(figures.memorization_vs_size(runs, threshold), "memorization vs size"),
                  "<h2>Figure 3: memorization vs train-test gap</h2>",
                  f"<p>Pearson r = <b>{_fmt(corr['pearson_r'])}</b>, "
                  f"p = {_fmt(corr['p_value'], '.3g')} over {corr['num_runs']} runs.</p>",
                  _img(figures.memorization_vs_gap(runs, threshold), "memorization vs gap")]
    parts += ["<h2>Figure 2: memorization during training</h2>",
              _img(figures.memorization_curve(runs, threshold), "memorization curve"),
              "<p class='note'>Hatched: the noise floor (up to the 95th percentile of the count "
              "with membership shuffled; its mean dotted); vertical dotted: onset; dashed: "
              "peak. The count has no interval: none whose coverage was measured reached its "
              "nominal rate.</p>",
              "<h2>Figure 4: score distributions across runs</h2>",
              _img(figures.run_score_histograms(runs, threshold=threshold), "scores by run")]
    modelwise = summary["transient"]["modelwise"]
    if modelwise:
        parts += ["<h2>Model-wise transient memorization</h2>",
                  _table(["Memorized by", "not by", "Count", "Score (by)", "Score (not by)"],
                         [_transient_row(t) for t in modelwise])]
    return "\n".join(parts)


def _transient_row(record: dict) -> list[str]:
    return [record["source"], record["target"], record["count"],
            f"{_fmt(record['source_mean'])} ± {_fmt(record['source_std'])}",
            f"{_fmt(record['target_mean'])} ± {_fmt(record['target_std'])}"]


def _run_section(run: Run, threshold, galleries: bool) -> str:
    label = stats.run_label(run)
    null = stats.noise_floor(run, threshold)
    counts = stats.stored_counts(run, threshold)
    stages = stats.memorization_stages(run.epochs, counts, floor=null.p95)
    metrics = run.metrics
    above = "above" if counts[-1] > null.p95[-1] else "NOT above"
    cut = stats.run_threshold(run, threshold)
    tested = run.memorized(cut, fdr=stats.run_fdr(run))
    facts = [["memorized (last epoch)", int(counts[-1])],
             ["noise floor (shuffled membership)",
              f"mean {null.mean[-1]:.1f}, 95th percentile {null.p95[-1]:.0f} "
              f"({null.num_permutations} permutations): the count is {above} noise"],
             ["memorized at FDR", f"{len(tested)} examples score above {cut:g} at false "
                                  f"discovery rate {stats.run_fdr(run):g} (at most that share "
                                  f"of them expected to score {cut:g} or less in truth)"],
             *([["reliability", reliability.describe(metrics["reliability"])]]
               if metrics.get("reliability") else []),
             ["onset / peak / final epoch",
              f"{stages['onset_epoch']} / {stages['peak_epoch']} / {stages['final_epoch']}"],
             ["peak / final count above noise",
              f"{stages['peak_count']:.0f} / {stages['final_count']:.0f}"],
             ["wall time (s)", _fmt(metrics.get("wall_time_s"), ".1f")]]
    parts = [f"<h2>Run {html.escape(label)}</h2>",
             *(f"<p class='warning'>Warning: {html.escape(w)}</p>"
               for w in metrics.get("warnings", [])),
             _table(["", ""], facts),
             _img(figures.memorization_curve(run, threshold), f"memorization curve {label}"),
             _img(figures.epoch_score_histograms(run, threshold=threshold),
                  f"scores by epoch {label}"),
             _img(figures.estimator_convergence(run), f"estimators by models {label}")]
    epochwise = transient.epochwise(run, threshold, stages["peak_epoch"])
    parts.append(f"<p>Epoch-wise transient: {html.escape(epochwise.describe())}.</p>")
    pairs = influence.run_high_influence_pairs(run, memorization_threshold=threshold)
    parts.append(_pairs_section(run, threshold, pairs))
    if galleries:
        try:  # the images live in the dataset, which may not be on this machine
            dataset = gallery.load_dataset(run)
            pictures = ["<h3>Most memorized training examples</h3>",
                        "<p>Under each image: its index and score, and the label suggested by "
                        "the models that held it out (their majority, with its share of their "
                        "votes); a suggestion other than the row's class is a label to check."
                        "</p>",
                        _img(gallery.most_memorized_gallery(run, dataset), f"gallery {label}")]
            if len(pairs):
                pictures.append(_img(gallery.influence_gallery(run, pairs, dataset),
                                     f"influence pairs {label}"))
        except UserError as err:
            pictures = [f"<p class='note'>No images: {html.escape(str(err))}</p>"]
        parts += pictures
    return "\n".join(parts)


def _pairs_section(run: Run, threshold, pairs: influence.InfluencePairs) -> str:
    """High-influence pairs with their noise floor and, per pair, its test and whether it
    passes Benjamini-Hochberg over the family."""
    parts = []
    pairs_null = influence.run_pairs_noise_floor(run, memorization_threshold=threshold)
    cut = influence.DEFAULT_INFLUENCE_THRESHOLD
    parts.append(f"<h3>High-influence pairs</h3><p>{len(pairs)} pairs with influence > {cut} "
                 f"and memorization > {stats.run_threshold(run, threshold):g}; shuffled "
                 f"membership gives {pairs_null.mean:.1f} on average (95th percentile "
                 f"{pairs_null.p95:.0f}, {pairs_null.num_permutations} permutations). "
                 f"{int(pairs.passes.sum())} of them have influence above {cut} at false "
                 f"discovery rate {pairs.fdr:g} (Benjamini-Hochberg over all "
                 f"{pairs.num_tests} memorized x test pairs; the p-value column is each "
                 f"pair's test of influence &le; {cut}).</p>")
    if len(pairs):
        parts.append(_table(["train index", "test index", "influence", "memorization",
                             "p-value", "passes"],
                            [[r["train_index"], r["test_index"], _fmt(r["influence"]),
                              _fmt(r["memorization"]), _fmt(r["pvalue"], ".2g"),
                              "yes" if r["passes"] else "no"]
                             for r in pairs.as_records(PAIRS_LISTED)]))
    return "\n".join(parts)


def _details(summary: dict) -> str:
    text = json.dumps(summary, indent=1, default=str)
    return ("<details><summary>Summary (JSON)</summary><pre>" + html.escape(text)
            + "</pre></details>")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxmem.report", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="HTML file (default: RUN_DIR/report.html for one run, "
                                      "./report.html for several)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="memorization threshold (default: each run's, 0.25)")
    parser.add_argument("--no-galleries", action="store_true",
                        help="skip the image galleries (no dataset needed)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out, args.threshold, not args.no_galleries)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
