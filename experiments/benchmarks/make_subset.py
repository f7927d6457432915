"""A few thousand real 28x28 images with planted label changes, as a user's `.npz`: the check
that a run finds memorization on real data (the changed labels can only be fitted by
memorising them, so a sensitive run scores them high).

    python experiments/benchmarks/make_subset.py --train 3000 --changed 30 --out fmnist-3000.npz

Reads the idx files of Fashion-MNIST (or MNIST: any folder with the four
`*-idx?-ubyte.gz` files), takes `--train` training and `--test` test images drawn from the
seed, and gives `--changed` of the training images another label (drawn from the seed too).
The file records which: `changed_index` and `original_label`, which `jaxmem` ignores and
`experiments/benchmarks/planted_scores.py` reads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from jaxmem.data.mnist import read_idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FILES = {"x_train": ("train-images-idx3-ubyte.gz", "images"),
         "y_train": ("train-labels-idx1-ubyte.gz", "labels"),
         "x_test": ("t10k-images-idx3-ubyte.gz", "images"),
         "y_test": ("t10k-labels-idx1-ubyte.gz", "labels")}


def read_source(folder: str) -> dict[str, np.ndarray]:
    """The four idx files of an MNIST-family folder, read by jaxmem's own idx reader."""
    return {name: read_idx(Path(folder) / file, kind, os.path.basename(folder))
            for name, (file, kind) in FILES.items()}


def build_subset(source: dict[str, np.ndarray], num_train: int, num_test: int,
                 num_changed: int, seed: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz dataset ([n, H, W, 1] uint8 images) drawn from `source` by the
    seed, with `num_changed` training labels changed to another class (also by the seed):
    `changed_index` and their `original_label` say which."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(len(source["y_train"]), num_train, replace=False))
    test = np.sort(rng.choice(len(source["y_test"]), num_test, replace=False))
    labels = source["y_train"][train].astype(np.int64)
    changed = np.sort(rng.choice(num_train, num_changed, replace=False))
    original = labels[changed].copy()
    num_classes = int(source["y_train"].max()) + 1
    labels[changed] = (original + rng.integers(1, num_classes, num_changed)) % num_classes
    return {"x_train": source["x_train"][train][..., None], "y_train": labels,
            "x_test": source["x_test"][test][..., None],
            "y_test": source["y_test"][test].astype(np.int64),
            "changed_index": changed, "original_label": original}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=FASHION_DIR)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    arrays = build_subset(read_source(args.source), args.train, args.test, args.changed,
                          args.seed)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {args.train} training images ({args.changed} labels changed), "
          f"{args.test} test images")


if __name__ == "__main__":
    main()
