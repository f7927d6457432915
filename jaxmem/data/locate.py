"""Where real datasets live, and the uint8 `.npy` cache that makes every load after the first cheap.

Data dir (one rule for every source): the `data_dir` argument (CLI `--data-dir`), else
`$JAXMEM_DATA`, else `~/.cache/jaxmem`. A missing CIFAR or Tiny ImageNet archive is downloaded
there on first use and checked against its published MD5 (`jaxmem.data.download`), unless
`--no-download` or `$JAXMEM_NO_DOWNLOAD` forbids it.

Cache: the first load decodes the official files once into a folder of `.npy` arrays plus a
`meta.json` written last (its presence marks a complete cache; it records a fingerprint of the
source files, so a replaced archive is decoded again). Arrays are written into temporary files
and moved into place with `os.replace`, so a crash never leaves a half-written array under a
final name. Later loads memory-map the arrays (`np.load(mmap_mode="r")`): a 1.2 GB Tiny ImageNet
costs no RAM until it is used. The cache goes beside the data (`<data dir>/jaxmem-cache/<name>/`);
if that folder cannot be written or its disk is full, under the default cache folder instead,
else the decoded data stay in memory (one warning names the folder and the room it lacked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from jaxmem import atomic
from jaxmem.errors import DiskFull

ENV_VAR = "JAXMEM_DATA"
DEFAULT_DIR = "~/.cache/jaxmem"
CACHE_FOLDER = "jaxmem-cache"  # created inside the data dir
CACHE_FORMAT = 1  # bump when the cache layout or decoding changes
META_FILE = "meta.json"

log = logging.getLogger(__name__)


def default_dir() -> Path:
    """The default data and cache folder, `~/.cache/jaxmem`."""
    return Path(DEFAULT_DIR).expanduser()


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the data folder: the argument, else `$JAXMEM_DATA`, else `~/.cache/jaxmem`."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_dir()


def fingerprint(paths: Iterable[str | os.PathLike], extra: str = "") -> str:
    """A short hash of the names, sizes and modification times of `paths` (plus `extra`)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{extra}\n".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cache_dirs(name: str, source_dir: Path) -> list[Path]:
    """Candidate cache folders for dataset `name` read from `source_dir`, preferred first."""
    source_key = hashlib.sha256(str(source_dir.resolve()).encode()).hexdigest()[:12]
    beside = source_dir / CACHE_FOLDER / name
    fallback = default_dir() / CACHE_FOLDER / f"{name}-{source_key}"
    return [beside] if beside == fallback else [beside, fallback]


class ArrayWriter:
    """Collects the arrays of one cache folder; `commit` moves them into place atomically.

    With `folder=None` the arrays live in memory (used when no folder is writable).
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._temp: dict[str, str] = {}  # array name -> temp path
        self._arrays: dict[str, np.ndarray] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            # Probe: a read-only folder fails here, before any decoding work.
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                pass

    def empty(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable array to fill; backed by a temp `.npy` file when there is a folder."""
        if self.folder is None:
            array = np.empty(shape, dtype)
        else:
            fd, temp_path = tempfile.mkstemp(dir=self.folder, prefix=f".{key}-", suffix=".npy.tmp")
            os.fchmod(fd, atomic.umask_mode())  # readable by whoever the umask lets read the data
            os.close(fd)
            self._temp[key] = temp_path
            array = atomic.open_memmap(temp_path, shape, dtype)
        self._arrays[key] = array
        return array

    def put(self, key: str, values: np.ndarray) -> np.ndarray:
        """Store a finished array; returns the stored copy."""
        values = np.asarray(values)
        array = self.empty(key, values.shape, values.dtype)
        array[...] = values
        return array

    @property
    def keys(self) -> list[str]:
        return sorted(self._arrays)

    def commit(self, meta: dict) -> dict[str, np.ndarray]:
        """Flush, move every array into place, then write `meta.json` last (marks completeness)."""
        if self.folder is None:
            return dict(self._arrays)
        meta_path = self.folder / META_FILE
        meta_path.unlink(missing_ok=True)  # an old meta must never vouch for new arrays
        for key, array in self._arrays.items():
            array.flush()
            os.replace(self._temp[key], self.folder / f"{key}.npy")
        self._arrays.clear()
        self._temp.clear()
        atomic.write_text(meta_path, json.dumps(meta, indent=1))
        return {key: np.load(self.folder / f"{key}.npy", mmap_mode="r") for key in meta["arrays"]}

    def discard(self) -> None:
        """Remove the temp files of an unfinished cache (and its folders, if left empty)."""
        self._arrays.clear()
        for temp_path in self._temp.values():
            Path(temp_path).unlink(missing_ok=True)
        self._temp.clear()
        if self.folder is not None:
            for folder in (self.folder, self.folder.parent):
                try:
                    folder.rmdir()  # only succeeds when empty
                except OSError:
                    break


def read_cache(folder: Path, source_fingerprint: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """Memory-map a complete cache in `folder` made from the same source files, else None."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("fingerprint") != source_fingerprint or meta.get("format") != CACHE_FORMAT:
            return None
        arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r") for key in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta


def cached_arrays(
    name: str,
    source_dir: Path,
    source_fingerprint: str,
    build: Callable[[ArrayWriter], dict],
) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays of dataset `name`, memory-mapped from its cache; decoded by `build` on a miss.

    `build(writer)` fills the writer (`writer.empty` / `writer.put`) and returns extra metadata
    (JSON-serialisable) stored in `meta.json` and returned with the arrays.
    """
    folders = cache_dirs(name, source_dir)
    for folder in folders:
        found = read_cache(folder, source_fingerprint)
        if found is not None:
            return found

    def fill(writer: ArrayWriter) -> tuple[dict[str, np.ndarray], dict]:
        extra = build(writer)
        meta = {"format": CACHE_FORMAT, "name": name, "fingerprint": source_fingerprint,
                "source": str(source_dir), "arrays": writer.keys, **extra}
        return writer.commit(meta), meta

    for folder in folders:
        try:
            writer = ArrayWriter(folder)
        except OSError as error:
            log.info("cannot write a cache in %s (%s); trying the next place", folder, error)
            continue
        try:
            return fill(writer)
        except DiskFull as full:  # a cache is a convenience: decode again, elsewhere
            writer.discard()
            log.warning("%s: cannot cache the decoded data: %s; trying the next place", name,
                        full.problem)
        except BaseException:
            writer.discard()
            raise
    log.warning("%s: no cache folder could be written (tried %s); keeping the data in memory",
                name, ", ".join(map(str, folders)))
    return fill(ArrayWriter(None))
