"""Datasets behind one registry: `load(name, data_dir=None, download=True, ...) -> Dataset`.

Nothing outside this package knows where data came from. Adding a source is one module with a
`load(data_dir) -> Dataset` function and one line in `SOURCES`; a source that can fetch its
official files (`jaxmem.data.download`) also takes `download` and is listed in `DOWNLOADABLE`.
Two sources are open families named by prefix: `tfds:NAME[/CONFIG]` (any TFDS image
classification dataset prepared in the data dir) and `folder:PATH` (images in class
subfolders); only they take `test_split` / `image_size`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxmem.data import (
    cifar,
    digits,
    folder_source,
    mnist,
    npz_file,
    synthetic,
    tfds_source,
    tiny_imagenet,
)
from jaxmem.data.dataset import Dataset
from jaxmem.errors import UserError

# name -> loader(data_dir) -> Dataset
SOURCES: dict[str, Callable[[str | None], Dataset]] = {
    "digits": digits.load,
    "synthetic": synthetic.load,
    "mnist": mnist.load_mnist,
    "fashion_mnist": mnist.load_fashion_mnist,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "tiny_imagenet": tiny_imagenet.load,
}
# Sources whose loader also takes `download` (fetch a missing official archive on first use).
DOWNLOADABLE = frozenset({"mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"})
FAMILIES = (f"{tfds_source.PREFIX}NAME[/CONFIG]", f"{folder_source.PREFIX}PATH")


def load(name: str, data_dir: str | None = None, download: bool = True,
         test_split: str | None = None, image_size: int | None = None) -> Dataset:
    """Load dataset `name`: a registry name, `tfds:NAME[/CONFIG]`, `folder:PATH`, or a path to
    a user `.npz` file.

    `download=False` (CLI `--no-download`) never fetches a missing archive; other sources
    ignore it. `test_split` (tfds: only) and `image_size` (tfds: and folder:) are refused by
    the sources that have no use for them.
    """
    if name.startswith(tfds_source.PREFIX):
        return tfds_source.load(name.removeprefix(tfds_source.PREFIX), data_dir, test_split,
                                image_size)
    if test_split is not None:
        raise UserError(f"--test-split applies to {tfds_source.PREFIX} datasets only, not "
                        f"{name!r}")
    if name.startswith(folder_source.PREFIX):
        return folder_source.load(name.removeprefix(folder_source.PREFIX), data_dir, image_size)
    if image_size is not None:
        raise UserError(f"--image-size applies to {tfds_source.PREFIX} and "
                        f"{folder_source.PREFIX} datasets only, not {name!r}")
    if name.endswith(".npz") or os.path.sep in name:
        return npz_file.load(name)
    if name not in SOURCES:
        raise UserError(
            f"unknown dataset {name!r}; choose one of {', '.join(sorted(SOURCES))}, "
            f"{', '.join(FAMILIES)}, or give a path to an .npz file"
        )
    if name in DOWNLOADABLE:
        return SOURCES[name](data_dir, download=download)
    return SOURCES[name](data_dir)


def load_for(config) -> Dataset:
    """The dataset a run's `Config` names, with its data settings."""
    return load(config.dataset, config.data_dir, download=config.download,
                test_split=config.test_split, image_size=config.image_size)


def slug(name: str) -> str:
    """A short name for `name` fit for a folder name: `tfds:emnist/letters` -> `emnist-letters`,
    `folder:/data/pets/` -> `pets`, `/data/mine.npz` -> `mine`."""
    if name.startswith(tfds_source.PREFIX):
        return name.removeprefix(tfds_source.PREFIX).replace("/", "-")
    path = name.removeprefix(folder_source.PREFIX).rstrip(os.sep)
    return os.path.splitext(os.path.basename(path))[0] or "dataset"


__all__ = ["DOWNLOADABLE", "FAMILIES", "SOURCES", "Dataset", "load", "load_for", "slug"]
