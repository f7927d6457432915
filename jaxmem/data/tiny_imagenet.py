"""Tiny ImageNet (200 classes, 64x64x3) from the standard `tiny-imagenet-200` folder or zip.

Place `tiny-imagenet-200.zip` (http://cs231n.stanford.edu/tiny-imagenet-200.zip) or the folder it
extracts to, `tiny-imagenet-200/`, in the data dir (`--data-dir`, else `$JAXMEM_DATA`, else
`~/.cache/jaxmem`). If neither is there, the zip is downloaded into the data dir and its checksum
verified (`jaxmem.data.download`), unless `--no-download` or `$JAXMEM_NO_DOWNLOAD` forbids it.

Order and labels: label k is line k of `wnids.txt`. Training examples are the classes in
`wnids.txt` order, and within a class the files of `train/<wnid>/images/` sorted by name (plain
string order: `n..._0.JPEG`, `n..._1.JPEG`, `n..._10.JPEG`, ...); `original_index` is the position
in that order (the identity, as the arrays are stored in it). The test split is the official
validation set, `val/images/` labelled by `val/val_annotations.txt`, in that file's line order.
The unlabelled `test/` folder is not used. Grayscale (and any non-RGB) images become RGB.

Default augmentation: random horizontal flip and translation by up to 8 px, the CIFAR setting
(4 px at 32x32) scaled with the image side, i.e. the same 1/8 of the image.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from jaxmem.data import download as downloads
from jaxmem.data import images, locate
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

NAME = "tiny_imagenet"
FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_SIZE = 64
FLIP = True
TRANSLATE = 8
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def load(data_dir: str | None = None, download: bool = True) -> Dataset:
    """Tiny ImageNet: 100,000 train / 10,000 test (official val) 64x64x3 images, 200 classes.

    A missing zip is downloaded first if `download` (and `$JAXMEM_NO_DOWNLOAD` is unset).
    """
    root = locate.data_dir(data_dir)
    tree = _open_tree(root, download)
    try:
        listing = _list(tree)
        arrays, meta = locate.cached_arrays(
            NAME, root, tree.fingerprint(listing), lambda writer: _decode(tree, listing, writer))
    finally:
        tree.close()
    return Dataset(NAME, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   len(listing.wnids), *normalization(NAME, 3),
                   flip=FLIP, translate=TRANSLATE, original_index=arrays["original_index"])


@dataclasses.dataclass
class _Listing:
    """What to decode, in dataset order; paths are relative to the tree's top folder."""

    wnids: list[str]
    train_files: list[str]
    train_labels: np.ndarray  # [N] int32
    test_files: list[str]
    test_labels: np.ndarray  # [N_test] int32


class _FolderTree:
    """The extracted `tiny-imagenet-200/` folder."""

    def __init__(self, top: Path):
        self.top = top
        self.where = str(top)

    def read_text(self, rel: str) -> str:
        return (self.top / rel).read_text()

    def list_dir(self, rel: str) -> list[str] | None:
        folder = self.top / rel
        if not folder.is_dir():
            return None
        with os.scandir(folder) as entries:  # no stat per file: 100,000 files list in ms
            return [entry.name for entry in entries if entry.is_file()]

    def read_bytes(self, rel: str) -> bytes:
        return (self.top / rel).read_bytes()

    def fingerprint(self, listing: _Listing) -> str:
        files = [self.top / "wnids.txt", self.top / "val" / "val_annotations.txt"]
        return locate.fingerprint(files, extra=_listing_key(listing))

    def close(self) -> None:
        pass


class _ZipTree:
    """`tiny-imagenet-200.zip`, read in place without extracting."""

    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)
        try:
            self.zip = zipfile.ZipFile(path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise UserError(f"{NAME}: cannot read the archive {path} ({error}); it looks "
                            f"corrupt or truncated: download {ARCHIVE} again") from error
        self.prefix = f"{FOLDER}/" if any(n.startswith(f"{FOLDER}/") for n in names) else ""
        self.files = {n[len(self.prefix):] for n in names
                      if n.startswith(self.prefix) and not n.endswith("/")}
        self.dirs: dict[str, list[str]] = {}
        for rel in self.files:
            parent, _, base = rel.rpartition("/")
            self.dirs.setdefault(parent, []).append(base)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def list_dir(self, rel: str) -> list[str] | None:
        return self.dirs.get(rel)

    def read_bytes(self, rel: str) -> bytes:
        if rel not in self.files:
            raise FileNotFoundError(f"{self.path}:{self.prefix}{rel}")
        try:
            return self.zip.read(self.prefix + rel)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
            raise UserError(f"{NAME}: cannot read {self.prefix}{rel} from {self.path} ({error}); "
                            f"the archive looks corrupt: download {ARCHIVE} again") from error

    def fingerprint(self, listing: _Listing) -> str:
        return locate.fingerprint([self.path], extra=_listing_key(listing))

    def close(self) -> None:
        self.zip.close()


def _listing_key(listing: _Listing) -> str:
    return "\n".join([NAME, *listing.wnids, *listing.train_files, *listing.test_files])


def _open_tree(root: Path, download: bool = True) -> _FolderTree | _ZipTree:
    for top in (root / FOLDER, root):
        if (top / "wnids.txt").is_file():
            return _FolderTree(top)
    if (root / ARCHIVE).is_file():
        return _ZipTree(root / ARCHIVE)
    if downloads.allowed(download):
        return _ZipTree(downloads.fetch(ARCHIVE, root, NAME))
    raise UserError(
        f"{NAME}: no data found in {root}: place the official {ARCHIVE} (from {URL}) or its "
        f"extracted folder {FOLDER}/ (with wnids.txt, train/, val/) into {root}, or point "
        f"--data-dir or ${locate.ENV_VAR} at the folder that holds it (downloads are off: "
        f"{downloads.OPT_OUT})"
    )


def _list(tree: _FolderTree | _ZipTree) -> _Listing:
    """Read wnids.txt, the train folders and val_annotations.txt into the dataset order."""
    try:
        wnids = [line.strip() for line in tree.read_text("wnids.txt").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{NAME}: cannot read wnids.txt in {tree.where} ({error})") from error
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{NAME}: wnids.txt in {tree.where} is empty or repeats a class id")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}

    train_files, train_labels = [], []
    for label, wnid in enumerate(wnids):
        rel = f"train/{wnid}/images"
        names = tree.list_dir(rel)
        names = sorted(n for n in names or [] if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise UserError(f"{NAME}: no training images in {rel}/ of {tree.where} "
                            f"(class {wnid} of wnids.txt); the data is incomplete")
        train_files += [f"{rel}/{n}" for n in names]
        train_labels += [label] * len(names)

    annotations = "val/val_annotations.txt"
    try:
        lines = tree.read_text(annotations).splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{NAME}: cannot read {annotations} in {tree.where} ({error})") from error
    test_files, test_labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(f"{NAME}: {annotations} line {number} in {tree.where} is not "
                            f"'<file>\\t<wnid from wnids.txt>...': {line[:80]!r}")
        test_files.append(f"val/images/{fields[0]}")
        test_labels.append(label_of[fields[1]])
    if not test_files:
        raise UserError(f"{NAME}: {annotations} in {tree.where} lists no images")
    return _Listing(wnids, train_files, np.asarray(train_labels, np.int32),
                    test_files, np.asarray(test_labels, np.int32))


def _decode_image(tree: _FolderTree | _ZipTree, rel: str) -> np.ndarray:
    """One image file -> [64, 64, 3] uint8 RGB."""
    try:
        data = tree.read_bytes(rel)
    except FileNotFoundError as error:
        raise UserError(f"{NAME}: {rel} is listed but missing in {tree.where}") from error
    except OSError as error:
        raise UserError(f"{NAME}: cannot read {rel} in {tree.where} ({error})") from error
    return images.decode(data, f"{NAME}: {rel} in {tree.where}", 3, (IMAGE_SIZE, IMAGE_SIZE))


def _decode_into(tree, files: list[str], out: np.ndarray) -> None:
    """Decode `files` into `out` [len(files), 64, 64, 3], in parallel threads for a folder."""
    # A zip has one shared file handle, which ZipFile does not promise to be thread-safe.
    threads = 1 if isinstance(tree, _ZipTree) else None
    images.fill(out, lambda i: _decode_image(tree, files[i]), threads)


def _decode(tree, listing: _Listing, writer: locate.ArrayWriter) -> dict:
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    x_train = writer.empty("x_train", (len(listing.train_files), *shape), np.uint8)
    _decode_into(tree, listing.train_files, x_train)
    x_test = writer.empty("x_test", (len(listing.test_files), *shape), np.uint8)
    _decode_into(tree, listing.test_files, x_test)
    writer.put("y_train", listing.train_labels)
    writer.put("y_test", listing.test_labels)
    writer.put("original_index", np.arange(len(listing.train_files), dtype=np.int64))
    return {}
