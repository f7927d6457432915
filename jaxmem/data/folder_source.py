"""A user's folder of images in class subfolders: `folder:PATH`.

Layout (torchvision's and TFDS's `ImageFolder`): `PATH/train/<class>/<image>` and
`PATH/test/<class>/<image>`, any depth below the class folder; image files by suffix (PNG,
JPEG, BMP, GIF, TIFF, WebP, PPM/PGM); hidden files and other suffixes are skipped. Classes are
the subfolders of `train/` in sorted order (label k is the k-th name, as torchvision numbers
them); `test/` may lack some of them but may not add any. Examples are ordered by class, then by
path within the class; that order is `original_index` (the identity), and `file_names` holds
each training image's path relative to `train/`.

Images are decoded once (`jaxmem.data.images`: all grayscale -> 1 channel, else RGB; one size
for all, or `--image-size N` resizes to N x N) into the uint8 `.npy` cache under the data dir
(`<data dir>/jaxmem-cache/folder-<hash of PATH>`), keyed by the listing (every file's path, size
and modification time) and the image size, so adding, removing or changing a file decodes again.
The folder itself is only read. Inputs are scaled by the generic constants (0.5, 0.25) and not
augmented by default (`--flip`, `--translate` turn that on for photos).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from jaxmem.data import images, locate
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

PREFIX = "folder:"
SPLITS = ("train", "test")
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
            ".pbm")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Listing:
    """What to decode, in dataset order; `files` are paths relative to the top folder."""

    classes: list[str]
    files: dict[str, list[str]]  # split -> ["train/<class>/<file>", ...]
    labels: dict[str, np.ndarray]  # split -> [n] int32


def load(path: str, data_dir: str | None = None, image_size: int | None = None) -> Dataset:
    """The images under `path` (train/ and test/ in class subfolders), via the data cache."""
    top = Path(path).expanduser()
    where = f"{PREFIX}{path}"
    listing = _list(top, where)
    every = [top / rel for split in SPLITS for rel in listing.files[split]]
    key = hashlib.sha256(str(top.resolve()).encode()).hexdigest()[:12]
    name = f"folder-{key}" + (f"-{image_size}px" if image_size else "")
    fingerprint = locate.fingerprint(every, extra="\n".join([where, str(image_size),
                                                             *listing.classes]))
    arrays, meta = locate.cached_arrays(
        name, locate.data_dir(data_dir), fingerprint,
        lambda writer: _decode(top, where, listing, image_size, writer))
    channels = arrays["x_train"].shape[-1]
    return Dataset(top.resolve().name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], len(listing.classes), *normalization("", channels),
                   flip=False, translate=0, original_index=arrays["original_index"],
                   file_names=arrays["file_names"])


def _image_files(folder: Path) -> tuple[list[str], int]:
    """Image files under `folder` (relative POSIX paths, sorted) and the count skipped."""
    found, skipped = [], 0
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            if not name.lower().endswith(SUFFIXES):
                skipped += 1
                continue
            found.append((Path(parent) / name).relative_to(folder).as_posix())
    return sorted(found), skipped


def _list(top: Path, where: str) -> _Listing:
    """Classes from train/'s subfolders; the image files of both splits in dataset order."""
    layout = (f"expected {top}/train/<class>/<images> and {top}/test/<class>/<images>")
    if not top.is_dir():
        raise UserError(f"{where}: there is no folder {top} ({layout})")
    for split in SPLITS:
        if not (top / split).is_dir():
            raise UserError(f"{where}: {top} has no {split}/ folder ({layout})")
    subfolders = {split: sorted(entry.name for entry in os.scandir(top / split)
                                if entry.is_dir() and not entry.name.startswith("."))
                  for split in SPLITS}
    classes = subfolders["train"]
    if not classes:
        raise UserError(f"{where}: {top / 'train'} has no class subfolders ({layout})")
    unknown = sorted(set(subfolders["test"]) - set(classes))
    if unknown:
        raise UserError(f"{where}: test/ has classes that train/ lacks: {', '.join(unknown)}")
    files, labels, skipped = {}, {}, 0
    for split in SPLITS:
        files[split], split_labels = [], []
        for label, cls in enumerate(classes):
            if cls not in subfolders[split]:
                continue
            names, skipped_here = _image_files(top / split / cls)
            skipped += skipped_here
            if not names and split == "train":
                raise UserError(f"{where}: the class folder {top / split / cls} holds no image "
                                f"files ({', '.join(SUFFIXES)})")
            files[split] += [f"{split}/{cls}/{name}" for name in names]
            split_labels += [label] * len(names)
        labels[split] = np.asarray(split_labels, np.int32)
    if not files["test"]:
        raise UserError(f"{where}: {top / 'test'} holds no image files in class subfolders")
    if skipped:
        log.warning("%s: skipped %d files whose names do not end in an image suffix", where,
                    skipped)
    return _Listing(classes, files, labels)


def _decode(top: Path, where: str, listing: _Listing, image_size: int | None,
            writer: locate.ArrayWriter) -> dict:
    every = [rel for split in SPLITS for rel in listing.files[split]]
    labels = [f"{where}: {rel}" for rel in every]
    headers = images.probe_all([top / rel for rel in every], labels)
    channels = images.channels_of(headers)
    size = images.common_size(headers, every, image_size, where)
    start = 0
    for split in SPLITS:
        rels = listing.files[split]
        out = writer.empty(f"x_{split}", (len(rels), *size, channels), np.uint8)
        images.fill(out, lambda i, rels=rels, start=start: images.decode(
            top / rels[i], labels[start + i], channels, size, resize=image_size is not None))
        writer.put(f"y_{split}", listing.labels[split])
        start += len(rels)
    train = listing.files["train"]
    writer.put("original_index", np.arange(len(train), dtype=np.int64))
    writer.put("file_names", np.asarray([rel.removeprefix("train/") for rel in train]))
    return {"classes": listing.classes}
