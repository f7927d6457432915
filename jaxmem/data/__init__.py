"""Datasets behind one registry: `load(name, data_dir=None) -> Dataset`.

Nothing outside this package knows where data came from. Adding a source is one module with a
`load(data_dir) -> Dataset` function and one line in `SOURCES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxmem.data import cifar, digits, npz_file, synthetic, tfds_source, tiny_imagenet
from jaxmem.data.dataset import Dataset
from jaxmem.errors import UserError

# name -> loader(data_dir) -> Dataset
SOURCES: dict[str, Callable[[str | None], Dataset]] = {
    "digits": digits.load,
    "synthetic": synthetic.load,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "tiny_imagenet": tiny_imagenet.load,
    "tfds:cifar10": tfds_source.load_cifar10,  # optional extra `tfds`
    "tfds:cifar100": tfds_source.load_cifar100,
}


def load(name: str, data_dir: str | None = None) -> Dataset:
    """Load dataset `name` (a registry name, or a path to a user `.npz` file)."""
    if name.endswith(".npz") or os.path.sep in name:
        return npz_file.load(name)
    if name not in SOURCES:
        raise UserError(
            f"unknown dataset {name!r}; choose one of {', '.join(sorted(SOURCES))} "
            "or give a path to an .npz file"
        )
    return SOURCES[name](data_dir)


__all__ = ["SOURCES", "Dataset", "load"]
