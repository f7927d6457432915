"""CIFAR-10 and CIFAR-100 from the official python-version files, in the original file order.

Place `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` (https://www.cs.toronto.edu/~kriz/
cifar.html), or the folder they extract to (`cifar-10-batches-py/`, `cifar-100-python/`), in the
data dir (`--data-dir`, else `$JAXMEM_DATA`, else `~/.cache/jaxmem`). If neither is there, the
archive is downloaded into the data dir and its checksum verified (`jaxmem.data.download`), unless
`--no-download` or `$JAXMEM_NO_DOWNLOAD` forbids it.

Order: training examples are data_batch_1..5 (CIFAR-10) or `train` (CIFAR-100) row by row, so
`original_index` is the identity and example i is row i of the official files. CIFAR-100 uses the
100 fine labels.

Default augmentation: random horizontal flip and translation by up to 4 px (the 32x32 setting of
Feldman & Zhang and of the usual CIFAR ResNet recipes).

The batches are pickles; they are read with an unpickler that accepts only numpy arrays and
plain containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from jaxmem.data import download as downloads
from jaxmem.data import locate
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

IMAGE_SIZE = 32
FLIP = True
TRANSLATE = 4
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    """Official file names and label key of one CIFAR variant."""

    name: str
    archive: str  # the official tarball
    folder: str  # the folder the tarball extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR10 = CifarSpec("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10)
CIFAR100 = CifarSpec("cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
                     ("train",), ("test",), b"fine_labels", 100)

# (module, name) pairs a CIFAR batch pickle may reference: numpy array reconstruction only
# (`numpy.core` in the official Python 2 files, `numpy._core` when written by numpy 2), and
# `_codecs.encode`, which Python 3 uses for bytes in protocol-2 pickles.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def load_cifar10(data_dir: str | None = None, download: bool = True) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test 32x32x3 images, 10 classes, official order."""
    return load_cifar(CIFAR10, data_dir, download)


def load_cifar100(data_dir: str | None = None, download: bool = True) -> Dataset:
    """CIFAR-100 (fine labels): 50,000 train / 10,000 test 32x32x3 images, official order."""
    return load_cifar(CIFAR100, data_dir, download)


def load_cifar(spec: CifarSpec, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Load a CIFAR variant from `data_dir` (resolved by `locate.data_dir`), via the cache.

    A missing archive is downloaded first if `download` (and `$JAXMEM_NO_DOWNLOAD` is unset).
    """
    root = locate.data_dir(data_dir)
    source = _find_source(spec, root, download)
    arrays, meta = locate.cached_arrays(
        spec.name, root, locate.fingerprint(source.files, extra=spec.name),
        lambda writer: _decode(spec, source, writer))
    return Dataset(spec.name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], spec.num_classes, *normalization(spec.name, 3),
                   flip=FLIP, translate=TRANSLATE, original_index=arrays["original_index"])


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the batches are: an extracted folder (`archive` None) or the tarball."""

    folder: Path | None
    archive: Path | None

    @property
    def files(self) -> list[Path]:
        if self.archive is not None:
            return [self.archive]
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def _find_source(spec: CifarSpec, root: Path, download: bool = True) -> _Source:
    needed = spec.train_files + spec.test_files
    folders = [root / spec.folder]
    if root.name == spec.folder:  # the data dir is the extracted folder itself
        folders.insert(0, root)
    for folder in folders:
        if all((folder / f).is_file() for f in needed):
            return _Source(folder, None)
    archive = root / spec.archive
    if archive.is_file():
        return _Source(None, archive)
    for folder in folders:
        if folder.is_dir():
            missing = [f for f in needed if not (folder / f).is_file()]
            raise UserError(
                f"{spec.name}: the folder {folder} is incomplete (missing {', '.join(missing)}); "
                f"extract {spec.archive} again or place the archive itself into {root}"
            )
    if downloads.allowed(download):
        return _Source(None, downloads.fetch(spec.archive, root, spec.name))
    raise UserError(
        f"{spec.name}: no data found in {root}: place the official {spec.archive} (from {URL}) "
        f"or its extracted folder {spec.folder}/ into {root}, or point --data-dir or "
        f"${locate.ENV_VAR} at the folder that holds it (downloads are off: {downloads.OPT_OUT})"
    )


def _read_batches(spec: CifarSpec, source: _Source) -> dict[str, bytes]:
    """Raw bytes of every needed batch file, by file name."""
    needed = spec.train_files + spec.test_files
    if source.archive is None:
        return {name: (source.folder / name).read_bytes() for name in needed}
    wanted = {f"{spec.folder}/{name}": name for name in needed}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source.archive, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise UserError(
            f"{spec.name}: cannot read the archive {source.archive} ({error}); it looks corrupt "
            f"or truncated: download {spec.archive} again from {URL}"
        ) from error
    missing = [name for name in needed if name not in found]
    if missing:
        raise UserError(
            f"{spec.name}: the archive {source.archive} lacks {', '.join(missing)} under "
            f"{spec.folder}/; is it the official python-version {spec.archive}?"
        )
    return found


def _parse_batch(spec: CifarSpec, raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (rows [n, 3072] uint8 as stored, labels [n] int32), checked."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # any unpickling failure means a bad file
        raise UserError(f"{spec.name}: {where} is not a readable CIFAR batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"{spec.name}: {where} lacks b'data' or {spec.label_key!r} (has {keys})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[spec.label_key])
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise UserError(f"{spec.name}: {where}: b'data' must be uint8 [n, {pixels}], "
                        f"got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{spec.name}: {where}: {len(data)} images but labels of shape "
                        f"{labels.shape} ({labels.dtype})")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(f"{spec.name}: {where}: labels outside 0..{spec.num_classes - 1}")
    return data, labels.astype(np.int32)


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Official rows [n, 3072] -> images [n, 32, 32, 3] (a view).

    Each row holds the red plane, then green, then blue, each 32x32 in row-major order.
    """
    return rows.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)


def _decode(spec: CifarSpec, source: _Source, writer: locate.ArrayWriter) -> dict:
    raw = _read_batches(spec, source)
    place = source.archive if source.archive is not None else source.folder
    stored = {}
    for split, names in (("train", spec.train_files), ("test", spec.test_files)):
        parts = [_parse_batch(spec, raw.pop(name), f"{name} in {place}") for name in names]
        count = sum(len(labels) for _, labels in parts)
        images = writer.empty(f"x_{split}", (count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        start = 0
        for rows, labels in parts:  # transpose straight into the cache file
            images[start:start + len(labels)] = rows_to_images(rows)
            start += len(labels)
        writer.put(f"y_{split}", np.concatenate([labels for _, labels in parts]))
        stored[split] = images
        del parts
    writer.put("original_index", np.arange(len(stored["train"]), dtype=np.int64))
    return {}
