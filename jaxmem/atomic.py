"""Atomic writes: a file appears under its final name complete or not at all.

Everything goes to a temporary name in the same folder and is renamed into place with
`os.replace` (atomic on POSIX within one filesystem), so a crash or SIGKILL at any moment leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temporary path beside `path`; renamed to `path` when the block succeeds, removed
    when it raises."""
    temporary = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def umask_mode(full: int = 0o666) -> int:
    """The permissions the umask gives a new file (full = 0o666) or folder (0o777): what
    `open` and `os.makedirs` give, and what `tempfile`'s private 0600/0700 must be set to for a
    group sharing the folder to read the result."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as temporary, open(temporary, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, record: dict) -> None:
    write_text(path, json.dumps(record, indent=2, sort_keys=True))


def write_npz(path: str | os.PathLike, **arrays) -> None:
    with replacing(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, **arrays)
