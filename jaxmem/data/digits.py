"""scikit-learn's 1,797 real 8x8 handwritten digits: the embedded default dataset."""

from __future__ import annotations

import numpy as np

from jaxmem.data.dataset import Dataset, normalization

TEST_FRACTION = 0.3
SPLIT_SEED = 0


def load(data_dir: str | None = None) -> Dataset:
    """Fixed 70/30 split (seed 0); pixels 0..16 scaled to 0..255; no flips (digits are chiral)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797,8,8,1]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    num_test = int(round(TEST_FRACTION * len(labels)))
    test, train = np.sort(order[:num_test]), np.sort(order[num_test:])
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10,
                   *normalization("digits", 1), flip=False, translate=1, original_index=train)
