"""Where the test suite's compile time goes: each XLA compile of each test, hit or miss.

    rm -rf .pytest_cache  # a cold suite: the tests' compilation cache emptied
    python experiments/benchmarks/suite_compiles.py [PYTEST ARGS, e.g. tests/test_ensemble.py]

Runs pytest with this file as a plugin (in every xdist worker too). The plugin reads what jax
logs about its persistent compilation cache (the suite sets one up in tests/conftest.py): for
each compile, the jitted function, the program's cache key, and a hit or a miss with the
seconds it took. It then prints, per function, the compile seconds, the misses and the
distinct programs among them, and the tests that spent longest compiling. Compiles in the
subprocesses that some tests start are not counted.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
import subprocess
import sys
import tempfile

import pytest

LOG_DIR = "JAXMEM_SUITE_COMPILES"  # set by the script for its pytest run
MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)' with key '([^']+)'")
HIT = re.compile(r"Persistent compilation cache hit for '([^']+)'")
SECONDS = re.compile(r"'([^']+)' took at least [0-9.]+ seconds to compile \(([0-9.]+)s\)")

_current = {"test": None}


class _Recorder(logging.Handler):
    """Appends each cache message, tagged with the running test, to this process's file."""

    def __init__(self, path: str):
        super().__init__(logging.DEBUG)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if MISS.search(message) or HIT.search(message) or SECONDS.search(message):
            with open(self.path, "a") as f:
                f.write(f"{_current['test']}\t{message}\n")


def pytest_configure(config) -> None:
    """As a plugin of the script's pytest run (in each worker): record."""
    if os.environ.get(LOG_DIR):
        logger = logging.getLogger("jax._src.compiler")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(_Recorder(os.path.join(os.environ[LOG_DIR], f"{os.getpid()}.log")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    yield


def summarise(log_dir: str, top: int = 25) -> None:
    seconds, misses, hits = (collections.defaultdict(float), collections.Counter(),
                             collections.Counter())
    programs, per_test = collections.defaultdict(set), collections.defaultdict(float)
    for path in glob.glob(os.path.join(log_dir, "*.log")):
        with open(path) as f:
            for line in f:
                test, message = line.rstrip("\n").split("\t", 1)
                if match := MISS.search(message):
                    misses[match[1]] += 1
                    programs[match[1]].add(match[2])
                elif match := HIT.search(message):
                    hits[match[1]] += 1
                elif match := SECONDS.search(message):
                    seconds[match[1]] += float(match[2])
                    per_test[test] += float(match[2])
    if not misses and not hits:
        print("no compile was logged: is the suite's compilation cache set "
              "(tests/conftest.py), or did jax change its log messages?")
        return
    print(f"compiling: {sum(seconds.values()):.1f} s over {sum(misses.values())} misses "
          f"({sum(len(p) for p in programs.values())} distinct programs), "
          f"{sum(hits.values())} cache hits")
    print(f"\n{'seconds':>8} {'misses':>7} {'programs':>9} {'hits':>6}  function")
    for name, total in sorted(seconds.items(), key=lambda item: -item[1])[:top]:
        print(f"{total:8.1f} {misses[name]:7d} {len(programs[name]):9d} {hits[name]:6d}  {name}")
    print(f"\n{'seconds':>8}  test (compiling)")
    for test, total in sorted(per_test.items(), key=lambda item: -item[1])[:top]:
        print(f"{total:8.1f}  {test}")


def main(pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as log_dir:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "suite_compiles", *pytest_args],
            env={**os.environ, LOG_DIR: log_dir, "PYTHONPATH": path})
        summarise(log_dir)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
