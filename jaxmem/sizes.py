"""Sizes in bytes as users give them (`--host-memory 6G`) and as the run's plan states them, in
one place below both the settings (config.py) and training (train/)."""

from __future__ import annotations

import re

from jaxmem.errors import UserError

SUFFIXES = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str, flag: str = "--host-memory") -> int:
    """Bytes of a size such as '6G', '6GiB', '1.5g', '512M' or '123456' (powers of 1024);
    a UserError naming `flag` for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"{flag} must be a size such as 6G, 512M or 1.5GiB, got {text!r}")
    return int(float(match.group(1)) * SUFFIXES[match.group(2)])



def gib(count: int | float) -> str:
    """Bytes for a log line: '2.31 GiB', or below 1 GiB '12.5 MiB'."""
    if abs(count) < 2**30:
        return f"{count / 2**20:.1f} MiB"
    return f"{count / 2**30:.2f} GiB"
