"""Synthetic long-tail data with planted sub-populations of known sizes (ground truth).

Each class owns sub-populations; a sub-population is a random prototype image plus noise, and
its examples share the class label. A sub-population of size 1 can only be fitted by memorising
its one example (held-out models never saw anything like it); a large sub-population is learnt
from its members, so holding one out barely matters. `subpop_size[i]` records the truth.
"""

from __future__ import annotations

import numpy as np

from jaxmem.data.dataset import Dataset, normalization

# Sizes of the sub-populations of every class: a long tail of singletons, a head of big groups.
SUBPOP_SIZES = (1, 1, 1, 1, 1, 1, 2, 2, 4, 8, 16, 32)
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NOISE_STD = 24.0  # in uint8 units; prototypes are uniform in 0..255, so groups stay separable
TEST_PER_SUBPOP = 1


def make(seed: int = 0, num_classes: int = NUM_CLASSES, sizes=SUBPOP_SIZES,
         image_shape=IMAGE_SHAPE, noise_std: float = NOISE_STD) -> Dataset:
    rng = np.random.default_rng(seed)
    subpop_labels = np.repeat(np.arange(num_classes), len(sizes))
    subpop_sizes = np.tile(np.asarray(sizes), num_classes)
    prototypes = rng.uniform(0, 255, size=(len(subpop_sizes), *image_shape))

    def sample(counts):
        which = np.repeat(np.arange(len(counts)), counts)
        noise = rng.normal(0.0, noise_std, size=(len(which), *image_shape))
        images = np.clip(np.round(prototypes[which] + noise), 0, 255).astype(np.uint8)
        return images, subpop_labels[which].astype(np.int32), which

    x_train, y_train, train_subpop = sample(subpop_sizes)
    x_test, y_test, _ = sample(np.full(len(subpop_sizes), TEST_PER_SUBPOP))
    order = rng.permutation(len(y_train))  # interleave groups so batches mix them
    x_train, y_train, train_subpop = x_train[order], y_train[order], train_subpop[order]
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes,
                   *normalization("synthetic", image_shape[-1]),
                   flip=False, translate=0, subpop_size=subpop_sizes[train_subpop].astype(np.int64))


def load(data_dir: str | None = None) -> Dataset:
    return make()
