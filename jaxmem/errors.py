"""The exception types a user's situation raises: the CLI prints the message on one line (no
traceback) and exits 2, or 75 for a full disk while finished work is kept."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input a user can fix (unknown name, bad value, unreadable file); never a bug."""


class DiskFull(UserError):
    """A write failed because the filesystem is full (ENOSPC) or the user's quota is used up
    (EDQUOT). Whatever was complete before is left as it was and the write's temporary files
    are removed. `kept`: the work directory whose finished waves or checkpoints hold the work
    so far (set by the work directory the write happened in; None: nothing to resume)."""

    def __init__(self, path: str, needed: int, code: int, free: int | None):
        self.path, self.needed, self.code, self.free = path, needed, code, free
        self.kept: str | None = None
        super().__init__(path)

    @property
    def problem(self) -> str:
        """What failed, where, and how much room it needed."""
        reason = "disk quota exceeded" if self.code == errno.EDQUOT else "no space left on device"
        room = f"needs about {self.needed:,} bytes" + (
            f", {self.free:,} free" if self.free is not None else "")
        return f"{self.path}: {reason} ({room})"

    def __str__(self) -> str:
        return f"{self.problem}; free space there (or write elsewhere), then try again"

