"""Sensitivity canaries: training examples whose label is changed to another class.

A changed label can only be fitted by memorising that one example, so a run that is sensitive
enough to measure memorization scores its canaries high. The canaries are drawn from the seed
alone (so parts, resumed and grown runs plant the same ones), recorded in the run directory,
reported apart (their recall: the share scoring above the threshold) and left out of every
count of the dataset's real examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmem import keys
from jaxmem.errors import UserError


@dataclasses.dataclass(frozen=True)
class Canaries:
    """index [n] (sorted training indices), original_label [n], label [n] (the planted one)."""

    index: np.ndarray
    original_label: np.ndarray
    label: np.ndarray


def plant(dataset, count: int, seed: int):
    """(dataset with `count` training labels changed, Canaries); the dataset unchanged for 0."""
    import jax  # only where canaries are planted: analysis never needs it

    num_train, num_classes = dataset.num_train, dataset.num_classes
    if count == 0:
        empty = np.zeros(0, np.int64)
        return dataset, Canaries(empty, empty, empty)
    if not 0 < count < num_train or num_classes < 2:
        raise UserError(f"--canaries must be between 0 and {num_train - 1} (the training set "
                        f"has {num_train} examples in {num_classes} classes), got {count}")
    choose, shift = jax.random.split(keys.purpose_key(seed, keys.CANARIES))
    index = np.sort(np.asarray(jax.random.choice(choose, num_train, (count,), replace=False)))
    original = np.asarray(dataset.y_train)[index].astype(np.int64)
    # another class, uniformly among the other C - 1
    offset = np.asarray(jax.random.randint(shift, (count,), 1, num_classes))
    label = (original + offset) % num_classes
    y_train = np.array(dataset.y_train, copy=True)
    y_train[index] = label
    return dataclasses.replace(dataset, y_train=y_train), Canaries(index, original, label)


def real_examples(num_train: int, canary_index: np.ndarray) -> np.ndarray:
    """[N] bool: True for the dataset's own examples, False for canaries."""
    real = np.ones(num_train, bool)
    real[np.asarray(canary_index, np.int64)] = False
    return real
