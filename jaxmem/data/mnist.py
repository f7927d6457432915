"""MNIST and Fashion-MNIST (60,000 train / 10,000 test 28x28x1 images, 10 classes) from their
four official idx files, in the official order.

Files: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
`t10k-labels-idx1-ubyte`, each gzipped (`.gz`, as published) or not, read as placed. They are
looked for in `<data dir>/<name>/` (`mnist/`, `fashion_mnist/`), in torchvision's layout
(`<data dir>/MNIST/raw/`, `<data dir>/FashionMNIST/raw/`), and in the data dir itself (e.g.
`--data-dir /usr/share/datasets/fashion-mnist`, where Debian's `dataset-fashion-mnist` package
puts them). Files missing from all of these are downloaded into `<data dir>/<name>/` and checked
against their published MD5s (`jaxmem.data.download`), unless `--no-download` or
`$JAXMEM_NO_DOWNLOAD` forbids it.

Order: the files' own, so `original_index` is the identity and example i is image i of
`train-images-idx3-ubyte`. Default augmentation: no flips (a mirrored digit is another symbol,
or none), translation by up to 2 px.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from pathlib import Path

import numpy as np

from jaxmem.data import download as downloads
from jaxmem.data import locate
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

IMAGE_SIZE = 28
NUM_CLASSES = 10
FLIP = False
TRANSLATE = 2
FILES = {  # (split, kind) -> official file name without .gz
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # idx type code of unsigned bytes
NDIM = {"images": 3, "labels": 1}


@dataclasses.dataclass(frozen=True)
class MnistSpec:
    """Where one MNIST-family set is published, with the MD5 of each official `.gz` file."""

    name: str
    torchvision_folder: str
    url: str  # folder URL, ends with /
    md5: dict[str, str]  # official .gz file name -> MD5

    def archive(self, filename: str) -> downloads.Archive:
        return downloads.Archive(self.url + filename, self.md5[filename], f"{self.name}/{filename}")


# MD5s: LeCun's published files (also checked by torchvision's MNIST, which downloads them from
# the mirror below); Fashion-MNIST: the table in its README. Debian's dataset-fashion-mnist
# ships the same compressed data with the gzip header's file name and time removed: put back,
# its four files reproduce these MD5s.
MNIST = MnistSpec("mnist", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
})
FASHION_MNIST = MnistSpec(
    "fashion_mnist", "FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
     "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
     "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"})


def load_mnist(data_dir: str | None = None, download: bool = True) -> Dataset:
    """MNIST handwritten digits, official order."""
    return load(MNIST, data_dir, download)


def load_fashion_mnist(data_dir: str | None = None, download: bool = True) -> Dataset:
    """Fashion-MNIST (Zalando article images), official order."""
    return load(FASHION_MNIST, data_dir, download)


def load(spec: MnistSpec, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Load an MNIST-family set from `data_dir` (resolved by `locate.data_dir`), via the cache."""
    root = locate.data_dir(data_dir)
    files = _find_files(spec, root, download)
    arrays, _ = locate.cached_arrays(
        spec.name, root, locate.fingerprint(files.values(), extra=spec.name),
        lambda writer: _decode(spec, files, writer))
    return Dataset(spec.name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], NUM_CLASSES, *normalization(spec.name, 1),
                   flip=FLIP, translate=TRANSLATE, original_index=arrays["original_index"])


def _placed(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_files(spec: MnistSpec, root: Path, download: bool) -> dict[tuple[str, str], Path]:
    """The four files, from the first folder that holds all of them, else downloaded."""
    target = root / spec.name
    folders = [target, root / spec.torchvision_folder / "raw", root]
    for folder in folders:
        found = {key: _placed(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found
    found = {key: _placed(target, stem) for key, stem in FILES.items()}
    missing = [f"{FILES[key]}.gz" for key, path in found.items() if path is None]
    if not downloads.allowed(download):
        raise UserError(
            f"{spec.name}: no data found in {root}: place the four official files "
            f"({', '.join(f'{stem}.gz' for stem in FILES.values())}, gzipped or not, from "
            f"{spec.url}) into {target}, or point --data-dir or ${locate.ENV_VAR} at the "
            f"folder that holds them (missing in {target}: {', '.join(missing)}; downloads "
            f"are off: {downloads.OPT_OUT})")
    for key, path in found.items():
        if path is None:
            filename = f"{FILES[key]}.gz"
            found[key] = downloads.fetch(filename, target, spec.name, spec.archive(filename))
    return found


def read_idx(path: Path, kind: str, dataset: str) -> np.ndarray:
    """One idx file (gzipped or not) -> uint8 array [n, 28, 28] (images) or [n] (labels)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{dataset}: cannot read {path} ({error}); it looks corrupt or "
                        f"truncated: place or download it again") from error
    ndim = NDIM[kind]
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise UserError(f"{dataset}: {path} is not an idx file of unsigned bytes with {ndim} "
                        f"dimension(s) (it starts {raw[:4].hex()}; expected 0000080{ndim})")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected_shape = (shape[0], IMAGE_SIZE, IMAGE_SIZE) if kind == "images" else shape
    if shape != expected_shape or len(raw) != header + int(np.prod(shape)):
        raise UserError(f"{dataset}: {path} holds {len(raw) - header:,} bytes of data for "
                        f"shape {shape}; expected {kind} of shape {expected_shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _decode(spec: MnistSpec, files: dict[tuple[str, str], Path],
            writer: locate.ArrayWriter) -> dict:
    counts = {}
    for split in ("train", "test"):
        images = read_idx(files[split, "images"], "images", spec.name)
        labels = read_idx(files[split, "labels"], "labels", spec.name)
        if len(images) != len(labels):
            raise UserError(f"{spec.name}: {files[split, 'images']} has {len(images)} images but "
                            f"{files[split, 'labels']} has {len(labels)} labels")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise UserError(f"{spec.name}: {files[split, 'labels']} has labels outside "
                            f"0..{NUM_CLASSES - 1}")
        writer.put(f"x_{split}", images[..., None])
        writer.put(f"y_{split}", labels.astype(np.int32))
        counts[split] = len(labels)
    writer.put("original_index", np.arange(counts["train"], dtype=np.int64))
    return {}
