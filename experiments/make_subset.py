"""A few thousand real 28x28 images with planted label changes, as a user's `.npz`: the check
that a run finds memorization on real data (the changed labels can only be fitted by
memorising them, so a sensitive run scores them high).

    python experiments/make_subset.py --train 3000 --changed 30 --out fmnist-3000.npz

Reads the idx files of Fashion-MNIST (or MNIST: any folder with the four
`*-idx?-ubyte.gz` files), takes `--train` training and `--test` test images drawn from the
seed, and gives `--changed` of the training images another label (drawn from the seed too).
The file records which: `changed_index` and `original_label`, which `jaxmem` ignores and
`experiments/planted_scores.py` reads.
"""

from __future__ import annotations

import argparse
import gzip
import os

import numpy as np


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzip): big-endian dims after a 4-byte magic whose last byte is the rank."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    rank = raw[3]
    shape = np.frombuffer(raw, ">u4", rank, 4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    load = lambda name: read_idx(os.path.join(args.source, name))  # noqa: E731
    x_train, y_train = load("train-images-idx3-ubyte.gz"), load("train-labels-idx1-ubyte.gz")
    x_test, y_test = load("t10k-images-idx3-ubyte.gz"), load("t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(args.seed)
    train = np.sort(rng.choice(len(x_train), args.train, replace=False))
    test = np.sort(rng.choice(len(x_test), args.test, replace=False))
    labels = y_train[train].astype(np.int64)
    changed = np.sort(rng.choice(args.train, args.changed, replace=False))
    original = labels[changed].copy()
    num_classes = int(y_train.max()) + 1
    labels[changed] = (original + rng.integers(1, num_classes, args.changed)) % num_classes
    np.savez_compressed(args.out, x_train=x_train[train][..., None], y_train=labels,
                        x_test=x_test[test][..., None], y_test=y_test[test].astype(np.int64),
                        changed_index=changed, original_label=original)
    print(f"{args.out}: {args.train} training images ({args.changed} labels changed), "
          f"{args.test} test images")


if __name__ == "__main__":
    main()
