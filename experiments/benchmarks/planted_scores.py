"""How well a run finds the label changes planted by `experiments/benchmarks/make_subset.py`.

    python experiments/benchmarks/planted_scores.py RUN_DIR fmnist-3000.npz

Prints own-subset accuracy, the AUC of the changed labels' scores against the rest's (the
probability that a changed label outscores an unchanged one, ties half), how many changed
labels score above the run's threshold, how many are in the set memorized at the run's false
discovery rate, how many are among the top k (k = the number changed) by the run's ranking, by
the plain score alone and by the margin estimate alone, and for how many the held-out models'
suggested label is the original one.
"""

from __future__ import annotations

import sys

import numpy as np

from jaxmem import load_run
from jaxmem.rundir.store import rank_order


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUC of positive against negative scores (NaN scores count as lowest)."""
    positive, negative = np.nan_to_num(positive, nan=-np.inf), np.nan_to_num(negative,
                                                                               nan=-np.inf)
    above = (positive[:, None] > negative[None]).mean()
    ties = (positive[:, None] == negative[None]).mean()
    return float(above + ties / 2)


def main(argv: list[str]) -> None:
    run = load_run(argv[0])
    with np.load(argv[1]) as planted:
        changed, original = planted["changed_index"], planted["original_label"]
    scores = run.memorization
    is_changed = np.zeros(len(scores), bool)
    is_changed[changed] = True
    top = run.most_memorized(len(changed))
    plain_only = rank_order(scores, np.zeros_like(scores))  # equal scores in index order
    margin_only = rank_order(run.memorization_margin, np.zeros_like(scores))
    threshold = run.metrics["threshold"]
    print(f"own-subset accuracy {run.metrics['train_acc']:.4f} (by evaluated epoch "
          f"{', '.join(f'{a:.3f}' for a in run.metrics['train_acc_by_epoch'])}), test "
          f"{run.metrics['test_acc']:.3f}, {run.config['epochs']} epochs")
    print(f"changed labels: AUC {auc(scores[is_changed], scores[~is_changed]):.3f}, "
          f"{int((scores[changed] > threshold).sum())} of {len(changed)} above {threshold}, "
          f"{int(is_changed[top].sum())} in the top {len(changed)}, mean score "
          f"{np.nanmean(scores[changed]):.2f}; memorized count {run.metrics['memorized_count']}")
    in_top = lambda order: int(is_changed[order[run.real[order]][:len(changed)]].sum())  # noqa: E731
    margin = run.memorization_margin
    best = np.nanmax(scores[run.real])
    print(f"changed labels in the top {len(changed)}: by the plain score alone (ties in index "
          f"order) {in_top(plain_only)}, by the margin estimate alone {in_top(margin_only)} "
          f"(AUC {auc(margin[is_changed], margin[~is_changed]):.3f}), by the run's ranking "
          f"(plain, ties by the margin estimate) {int(is_changed[top].sum())}; "
          f"{int((scores[run.real] == best).sum())} examples tie at the top score {best:.2f}")
    at_fdr = run.memorized(threshold, fdr=run.metrics["fdr"])
    print(f"memorized at FDR {run.metrics['fdr']:g}: {len(at_fdr)} examples, "
          f"{int(is_changed[at_fdr].sum())} of them changed labels")
    print(f"suggested label (held-out models' majority) = the original label for "
          f"{int((run.suggested_label[changed] == original).sum())} of {len(changed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
