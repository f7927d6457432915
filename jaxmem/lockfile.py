"""One writer at a time: an exclusive `fcntl.flock` on a lock file, refused at once (not waited
for) when another process holds it. The kernel releases the lock when its holder dies, even by
SIGKILL, so a killed run never blocks the next one."""

from __future__ import annotations

import fcntl
import os

from jaxmem.errors import UserError


class Lock:
    """An exclusive lock on `path` (created if missing), held until `release()`."""

    def __init__(self, path: str, refusal: str):
        """refusal: the UserError message when another process holds the lock."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(refusal) from None
            # The holder may have deleted the file (with its directory) between our open and
            # our lock: then we locked an orphan, and a newcomer could lock the new file.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None
