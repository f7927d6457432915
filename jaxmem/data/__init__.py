"""Datasets behind one registry: `load(name, data_dir=None, download=True) -> Dataset`.

Nothing outside this package knows where data came from. Adding a source is one module with a
`load(data_dir) -> Dataset` function and one line in `SOURCES`; a source that can fetch its
official files (`jaxmem.data.download`) also takes `download` and is listed in `DOWNLOADABLE`.
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
# Sources whose loader also takes `download` (fetch a missing official archive on first use).
DOWNLOADABLE = frozenset({"cifar10", "cifar100", "tiny_imagenet"})


def load(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Load dataset `name` (a registry name, or a path to a user `.npz` file).

    `download=False` (CLI `--no-download`) never fetches a missing archive; other sources
    ignore it.
    """
    if name.endswith(".npz") or os.path.sep in name:
        return npz_file.load(name)
    if name not in SOURCES:
        raise UserError(
            f"unknown dataset {name!r}; choose one of {', '.join(sorted(SOURCES))} "
            "or give a path to an .npz file"
        )
    if name in DOWNLOADABLE:
        return SOURCES[name](data_dir, download=download)
    return SOURCES[name](data_dir)


__all__ = ["DOWNLOADABLE", "SOURCES", "Dataset", "load"]
