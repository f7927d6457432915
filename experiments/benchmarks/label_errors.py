"""Changed labels found by jaxmem's own rankings and by cleanlab, on real Fashion-MNIST.

    pip install -e ".[dev]"   # cleanlab comes with the dev extra; jaxmem never imports it
    nice -n 10 python experiments/benchmarks/label_errors.py --train 2000 --changed 20 \
        --num-models 16 --out runs/label-errors

Builds a subset of Fashion-MNIST (`--train` training and `--test` test images drawn from the
seed, read from the idx files in `--fashion-dir`: Debian's `dataset-fashion-mnist` package puts
them in /usr/share/datasets/fashion-mnist), changes `--changed` training labels (drawn from the
seed, each to another class), and then:

1. runs a jaxmem ensemble on it (`--num-models` models on random subsets of r = 0.7, the
   dataset's recipe for epochs, batch and learning rate unless given);
2. trains the same architecture with the same recipe by 5-fold cross-validation (5 models, each
   on 4/5 of the data, with jaxmem's own training code: masks from the folds), whose held-out
   predictions are the usual out-of-sample probabilities of label-error tools.

For k = the number of changed labels it reports the precision and recall of the changed labels
among the top k of: jaxmem's memorization score; jaxmem's suggested label disagreeing with the
label, ranked by its share of the held-out votes; cleanlab's `find_label_issues` (ranked by
self-confidence) on jaxmem's `heldout_probs`; and the same on the cross-validated
probabilities. cleanlab may flag fewer than k: its top k is then all it flags. Results go to
`OUT/results.json`, with each method's training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling make_subset.py
from make_subset import FASHION_DIR, build_subset, read_source  # noqa: E402


def fold_masks(num_examples: int, folds: int, seed: int) -> np.ndarray:
    """[folds, N] bool: model f trains on every example outside fold f (folds from the seed,
    sizes differing by at most one)."""
    fold = np.empty(num_examples, np.int64)
    fold[np.random.default_rng(seed).permutation(num_examples)] = np.arange(num_examples) % folds
    return fold[None, :] != np.arange(folds)[:, None]


def top_k_hits(ranked: np.ndarray, changed: np.ndarray, k: int) -> dict:
    """Precision and recall of the changed labels among the first k of `ranked` (all of it when
    shorter)."""
    top = np.asarray(ranked)[:k]
    found = int(np.isin(top, changed).sum())
    return {"found": found, "ranked": len(top), "precision": found / max(len(top), 1),
            "recall": found / len(changed)}


def rank_by_suggestion(labels, suggested, share, heldout_probs) -> np.ndarray:
    """Indices whose held-out suggestion disagrees with the label, largest share first; equal
    shares (with ~5 held-out models, many are 1.0) by the held-out probability of the given
    label, lowest first."""
    disagree = np.flatnonzero((suggested >= 0) & (suggested != labels))
    confidence = heldout_probs[disagree, labels[disagree]]
    return disagree[np.lexsort((confidence, -share[disagree]))]


def out_of_sample_probs(prob_sum: np.ndarray, votes: np.ndarray) -> tuple[np.ndarray, int]:
    """Mean held-out probabilities [N, C]; rows no model held out become uniform (cleanlab
    takes no NaN), with how many there were."""
    count = votes.sum(axis=1)
    probs = prob_sum / np.maximum(count, 1)[:, None]
    probs[count == 0] = 1.0 / probs.shape[1]
    return probs, int((count == 0).sum())


def cleanlab_ranking(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """cleanlab's flagged label issues, most likely first (self-confidence)."""
    from cleanlab.filter import find_label_issues

    return find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence",
                             n_jobs=1)  # no fork of a process running JAX


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-dir", default=FASHION_DIR)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="test images")
    parser.add_argument("--changed", type=int, default=20, help="labels changed")
    parser.add_argument("--num-models", type=int, default=16, help="K of the jaxmem run")
    parser.add_argument("--arch", default="tiny_cnn")
    parser.add_argument("--epochs", type=int, help="default: the dataset's recipe")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/label-errors")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("cleanlab") is None:  # before any training
        print("error: this comparison needs cleanlab, which jaxmem does not depend on: pip "
              "install cleanlab", file=sys.stderr)
        return 2
    from jaxmem import data, load_run, recipes
    from jaxmem.train.loop import train_ensemble
    from jaxmem.train.runner import run

    os.makedirs(args.out, exist_ok=True)
    arrays = build_subset(read_source(args.fashion_dir), args.train, args.test, args.changed,
                          args.seed)
    changed = arrays["changed_index"]
    npz = os.path.join(args.out, "fashion_subset.npz")
    np.savez(npz, **arrays)

    given = {"arch": args.arch, "dataset": npz, "num_models": args.num_models,
             "seed": args.seed, **({"epochs": args.epochs} if args.epochs else {})}
    config, _ = recipes.resolve(given)
    ensemble = load_run(run(config, os.path.join(args.out, "ensemble"), overwrite=True))

    cv_config = dataclasses.replace(config, num_models=args.folds,
                                    subset_ratio=1 - 1 / args.folds)
    tic = time.perf_counter()
    cv = train_ensemble(cv_config, data.load(npz), fold_masks(args.train, args.folds, args.seed))
    cv_seconds = time.perf_counter() - tic

    labels, k = arrays["y_train"], len(changed)
    jaxmem_probs, jaxmem_unheld = out_of_sample_probs(ensemble.extra["heldout_prob_sum"],
                                                      ensemble.extra["heldout_votes"])
    cv_probs, _ = out_of_sample_probs(cv.heldout.prob_sum, cv.heldout.votes)
    rankings = {
        "jaxmem memorization": ensemble.ranking(),
        "jaxmem suggested label": rank_by_suggestion(labels, ensemble.suggested_label,
                                                     ensemble.suggested_label_share,
                                                     jaxmem_probs),
        "cleanlab on jaxmem heldout_probs": cleanlab_ranking(labels, jaxmem_probs),
        f"cleanlab on {args.folds}-fold CV": cleanlab_ranking(labels, cv_probs),
    }
    results = {name: top_k_hits(ranked, changed, k) for name, ranked in rankings.items()}
    record = {"command": " ".join(sys.argv), "k": k, "num_train": args.train,
              "num_models": args.num_models, "epochs": config.epochs,
              "batch_size": config.batch_size, "lr": config.lr,
              "jaxmem_seconds": ensemble.metrics["wall_time_s"],
              "jaxmem_train_acc": ensemble.metrics["train_acc"],
              "jaxmem_examples_never_held_out": jaxmem_unheld,
              "cv_seconds": cv_seconds, "cv_train_acc": float(
                  ((cv.correct_train[-1] & cv.masks).sum(1) / cv.masks.sum(1)).mean()),
              "results": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    for name, hits in results.items():
        print(f"{name:34s} top {k}: {hits['found']:3d} changed labels of {hits['ranked']} "
              f"(precision {hits['precision']:.2f}, recall {hits['recall']:.2f})")
    print(f"time: jaxmem {record['jaxmem_seconds']:.0f} s ({args.num_models} models), "
          f"cross-validation {cv_seconds:.0f} s ({args.folds} models)")
    return 0


if __name__ == "__main__":
    from jaxmem.train import lowering

    lowering.reexec_with_process_env()  # allocator settings, as experiments/run.py
    sys.exit(main())
