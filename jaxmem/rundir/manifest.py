"""Whether a run directory is whole: every array file it was written with, at its size, with
its contents.

The writer records each array file of the directory (every `.npy` and `.npz` it holds, found by
listing the folder, not named here) in config.json under `files`: its size in bytes and its
SHA-256 (the same as `sha256sum FILE`). `check` compares a directory against that record and
names the first file that differs: sizes first (a file missing or cut short, as an interrupted
copy leaves it, costs one `stat`), then the checksums (a file damaged in place). A directory
written before the record existed is checked as far as its files allow: every `.npy` against
the size its header gives, every `.npz` against its zip structure and CRC-32s.

The JSON records (config.json, metrics.json) are not listed: they are parsed on every load,
and a damaged one fails to parse.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import zipfile
import zlib

import numpy as np

from jaxmem.errors import UserError

RECORD = "files"  # config.json's entry: {name: {"bytes": size, "sha256": hex digest}}
ARRAY_FILES = (".npy", ".npz")
RECOPY = "copy the run directory again from where it was written"
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}


class DamagedRun(UserError):
    """A run directory whose files differ from what was written: missing, cut short or
    damaged."""


def array_files(folder: str) -> list[str]:
    """The array files of `folder`, by name, sorted."""
    return sorted(name for name in os.listdir(folder) if name.endswith(ARRAY_FILES))


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256s(folder: str, names: list[str]) -> list[str]:
    """The SHA-256 of each file, hashed side by side (hashlib lets go of the GIL while it
    hashes, so the files of a run take the time of the largest on enough cores)."""
    paths = [os.path.join(folder, name) for name in names]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))
                                               ) as pool:
        return list(pool.map(sha256, paths))


def describe(folder: str) -> dict[str, dict]:
    """The record of every array file in `folder`: {name: {"bytes", "sha256"}}."""
    names = array_files(folder)
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": digest}
            for name, digest in zip(names, sha256s(folder, names), strict=True)}


def check(folder: str, recorded: dict[str, dict] | None) -> None:
    """Raise DamagedRun naming the first file of `folder` that differs from `recorded` (the
    config's `files`; None for a directory written before it: checked as far as its files
    allow)."""
    if recorded is None:
        for name in array_files(folder):
            check_whole(os.path.join(folder, name))
        return
    for name, expected in sorted(recorded.items()):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DamagedRun(f"{path}: missing (expected {expected['bytes']:,} bytes): the "
                             f"directory is incomplete; {RECOPY}")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise DamagedRun(f"{path}: {size:,} bytes, expected {expected['bytes']:,}: the "
                             f"directory is incomplete; {RECOPY}")
    names = sorted(recorded)
    for name, digest in zip(names, sha256s(folder, names), strict=True):
        path, expected = os.path.join(folder, name), recorded[name]
        if digest != expected["sha256"]:
            raise DamagedRun(f"{path}: {expected['bytes']:,} bytes as recorded, but its "
                             f"SHA-256 differs from the recorded one: the file is damaged; "
                             f"{RECOPY}")


def check_whole(path: str) -> None:
    """A file of a directory written before the record: a .npy holds the bytes its header
    says, a .npz is a whole zip whose members pass their CRC-32 checks."""
    size = os.path.getsize(path)
    try:
        if path.endswith(".npz"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise DamagedRun(f"{path}: its member {bad} is damaged (CRC-32 or header); "
                                 f"{RECOPY}")
            return
        with open(path, "rb") as f:
            read_header = NPY_HEADERS.get(np.lib.format.read_magic(f))
            if read_header is None:  # a format version jaxmem never writes
                return
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DamagedRun(f"{path}: unreadable ({size:,} bytes: {error}): {RECOPY}") from None
    if size != expected:
        raise DamagedRun(f"{path}: {size:,} bytes, expected {expected:,} from its header: the "
                         f"directory is incomplete; {RECOPY}")
