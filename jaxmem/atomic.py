"""Atomic, durable writes: a file (or a folder) appears under its final name complete or not at
all, and stays complete after the machine crashes.

Everything goes to a temporary name in the same folder, is flushed to the disk (`fsync`), is
renamed into place with `os.replace` (atomic on POSIX within one filesystem), and then the
folder holding it is flushed, so that the rename is on the disk too. Without the first flush,
ext4, XFS and network filesystems may keep the rename after a power loss or a node crash and
lose the data (the file exists under its final name, empty or cut short); without the second,
the new name itself may be lost. A SIGKILL at any moment leaves the old file or the new one.

A write that fails for lack of room (ENOSPC: the filesystem is full; EDQUOT: the quota is used
up) raises `DiskFull`, naming the file and about how many bytes it needed; its temporary is
removed and what was there before is untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys

import numpy as np

from jaxmem.errors import DiskFull

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# Bytes a .npz member takes beyond its array's data: the .npy header (128 bytes for every array
# jaxmem writes) and the zip entry's local and central headers (76 bytes + 2 x its name).
NPY_HEADER_BYTES, ZIP_ENTRY_BYTES = 128, 76
FOLDER_BYTES = 4096  # a new folder takes one block of its filesystem


def umask_mode(full: int = 0o666) -> int:
    """The permissions the umask gives a new file (full = 0o666) or folder (0o777): what
    `open` and `os.makedirs` give, and what `tempfile`'s private 0600/0700 must be set to for a
    group sharing the folder to read the result."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def sync_file(path: str | os.PathLike) -> None:
    """Flush a file's data and size to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (files created, renamed or removed in it) to the disk. A
    filesystem that cannot flush a folder (EINVAL) needs no flush to keep its entries."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def make_folder(path: str | os.PathLike) -> None:
    """`os.makedirs(path, exist_ok=True)`, each folder it creates flushed into its parent."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    make_folder(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    sync_folder(parent)


def nearest_existing(path: str | os.PathLike) -> str:
    """`path` made absolute, or its nearest parent that exists (where a file would go)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write in the filesystem holding `path` (or its
    nearest existing parent); None where that cannot be read."""
    try:
        stats = os.statvfs(nearest_existing(path))
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def room_for(path: str | os.PathLike, needed: int):
    """Turn a full disk or quota (an OSError with ENOSPC or EDQUOT) inside the block into
    `DiskFull` naming `path` and the `needed` bytes (about what the write takes)."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        free = free_bytes(path) if error.errno == errno.ENOSPC else None
        raise DiskFull(os.fspath(path), needed, error.errno, free) from None


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temporary path beside `path`; when the block succeeds it is flushed, renamed to
    `path` and the folder flushed; when anything raises it is removed."""
    temporary = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        yield temporary
        sync_file(temporary)
        os.replace(temporary, path)
        sync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with room_for(path, len(data)), replacing(path) as temporary, open(temporary, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, record: dict) -> None:
    write_text(path, json_text(record))


def json_text(record: dict) -> str:
    """How jaxmem writes every JSON record (sorted keys, indented)."""
    return json.dumps(record, indent=2, sort_keys=True)


def npz_bytes(arrays: dict) -> int:
    """About the bytes an uncompressed .npz of `arrays` takes (an upper bound for a compressed
    one)."""
    return sum(np.asarray(value).nbytes + NPY_HEADER_BYTES + ZIP_ENTRY_BYTES + 2 * len(name)
               for name, value in arrays.items())


def write_npz(path: str | os.PathLike, **arrays) -> None:
    with room_for(path, npz_bytes(arrays)), replacing(path) as temporary, \
            open(temporary, "wb") as f:
        np.savez(f, **arrays)


class _WriteOnly:
    """A file as numpy sees it through `write` alone. np.save writes a real file with
    `ndarray.tofile`, whose error on a full disk ("N requested and M written") carries no
    errno; through `write` the disk's own ENOSPC or EDQUOT comes back."""

    def __init__(self, file):
        self.write = file.write


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save(path, array), reporting a full disk as one (into a staging folder: no rename)."""
    with open(path, "wb") as f:
        np.save(_WriteOnly(f), array)


def open_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> np.memmap:
    """A new .npy file at `path` memory-mapped for writing, its disk blocks allocated first.

    `np.lib.format.open_memmap` alone makes a sparse file: on a full disk the first page that
    finds no block kills the process with SIGBUS, without a word. Here the room is taken at
    once (`posix_fallocate`), so a full disk or quota raises `DiskFull` naming `path` before
    anything is written, and the file is removed."""
    needed = NPY_HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with room_for(path, needed):
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as error:
                if error.errno in FULL_DISK:
                    raise
                # a filesystem that cannot reserve blocks at all: the sparse file, as before
            finally:
                os.close(fd)
    except DiskFull:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return array


# Linux's renameat2(2) with RENAME_EXCHANGE swaps two names in one step (glibc >= 2.28).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(first: str, second: str) -> bool:
    """Swap the names of two existing paths atomically; False, with nothing changed, where
    the C library, the kernel or the filesystem cannot (e.g. NFS)."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                     _RENAME_EXCHANGE) == 0


def replace_folder(staging: str, path: str) -> None:
    """Put the complete folder `staging` in place of `path` durably: every file in it and the
    folder itself are flushed first, then it is renamed to `path` and the parent flushed. A
    folder already at `path` is swapped with it in one step where the filesystem can
    (`exchange`), so that `path` always holds one of the two, and then removed; elsewhere it
    is kept under another name until the new one is in place (put back if the rename fails),
    so it is lost only once the new one is complete."""
    for name in os.listdir(staging):
        sync_file(os.path.join(staging, name))
    sync_folder(staging)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and exchange(staging, path):
        sync_folder(parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, under the staging name
        return
    old, moved = f"{staging}.old", False
    try:
        if os.path.exists(path):
            os.replace(path, old)
            moved = True
        os.replace(staging, path)
    except BaseException:
        if moved and not os.path.exists(path):
            os.replace(old, path)
        raise
    try:
        sync_folder(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)
