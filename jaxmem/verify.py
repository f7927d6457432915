"""Check that run directories are whole: every array file at the size and with the SHA-256
that config.json recorded when the run was written (what `jaxmem.load_run` checks on every
load), e.g. after copying one from a cluster (an interrupted copy leaves files missing or cut
short).

    python -m jaxmem.verify RUN [RUN ...]

One line per run. Exit status: 0 every run is whole; 1 a file differs (the line names the first
and what to do); 2 RUN is not a run directory. A run written before checksums were recorded is
checked as far as its files allow (each .npy against its header, each .npz against its
CRC-32s), and the line says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jaxmem.errors import UserError
from jaxmem.rundir import manifest
from jaxmem.rundir.store import load_run


def verify(path: str) -> str:
    """The line saying that run directory `path` is whole; DamagedRun naming the first file
    that is not, UserError when `path` is no run directory."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is not a run directory (it has no config.json)")
    recorded = load_run(path).config.get(manifest.RECORD)
    if recorded is None:
        return (f"{path}: written before jaxmem recorded checksums; its "
                f"{len(manifest.array_files(path))} array files are whole as far as they show "
                "(.npy sizes match their headers, .npz CRC-32s match)")
    total = sum(entry["bytes"] for entry in recorded.values())
    return (f"{path}: {len(recorded)} array files, {total:,} bytes, match the sizes and SHA-256 "
            "checksums recorded in config.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxmem.verify",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory")
    status = 0
    for path in parser.parse_args(argv).runs:
        try:
            print(verify(path))
        except manifest.DamagedRun as damaged:
            print(f"error: {damaged}", file=sys.stderr)
            status = max(status, 1)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
