"""Exclusive `fcntl.flock` locks on lock files: one writer of a run's work directory at a time
(refused at once when another process holds it), one download of a file into a shared data dir
(waited for). The kernel releases a lock when its holder dies, even by SIGKILL, so a killed
process never blocks the next one."""

from __future__ import annotations

import fcntl
import os
import sys

from jaxmem.errors import UserError


def lock_file(path: str, waiting: str | None = None) -> int | None:
    """A descriptor holding an exclusive flock on `path` (created if missing). When another
    process holds it: None at once, or, given `waiting`, that line on stderr and a wait for it.
    A holder may remove the file after releasing it (a download's lock) or with its directory:
    a lock taken on a file no longer at `path` is dropped and taken again on the file there."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is None:
                    os.close(fd)
                    return None
                print(waiting, file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


class Lock:
    """An exclusive lock on `path` (created if missing), held until `release()`."""

    def __init__(self, path: str, refusal: str):
        """refusal: the UserError message when another process holds the lock."""
        self.fd = lock_file(path)
        if self.fd is None:
            raise UserError(refusal)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None
