"""What durable writes and the integrity check of run directories cost, on the disk under --dir.

    python experiments/benchmarks/storage_costs.py --dir=DIR [--repeats=5] [--skip-run]

1. A checkpoint (`WorkDir.save_checkpoint`) of 1, 16 and 128 MiB of states, written with and
   without the flushes (fsync of the file before its rename, of its folder after), median of
   --repeats, alternating; "flushed MB/s" is what the disk takes synchronously.
2. A run directory (`save_run`) of the default run's size (K = 32 models x N = 1,258 digits,
   8 evaluated epochs) and of K = 2,000 x N = 50,000 (CIFAR-10: N_test = 10,000, 100 classes
   of held-out sums, 10 evaluated epochs), with and without the flushes; its SHA-256 record is
   part of both.
3. The check `load_run` makes of the large directory (sizes, then SHA-256 of every array
   file): with the files in the page cache, and with them evicted first (posix_fadvise
   DONTNEED), i.e. read from the disk.
4. Unless --skip-run: the default run (`experiments/run.py` without flags, the embedded digits)
   with every flush timed: how many there were and the seconds they took, against the run's
   wall time.
The arrays are random (correctness and masks as random bits), so that nothing compresses
better than a real run's would; only sizes matter here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import numpy as np

from jaxmem import atomic
from jaxmem.rundir import manifest
from jaxmem.rundir.store import read_record, save_run
from jaxmem.train.checkpoint import WorkDir

CHECKPOINT_MIB = (1, 16, 128)
# (label, K models, N examples, N_test, evaluated epochs, classes)
RUN_SIZES = (("default run, K = 32 x N = 1,258", 32, 1258, 539, 8, 10),
             ("K = 2,000 x N = 50,000", 2000, 50_000, 10_000, 10, 100))


@contextlib.contextmanager
def flushes(enabled: bool):
    """Run the block with jaxmem's flushes as they are, or as no-ops."""
    saved = atomic.sync_file, atomic.sync_folder
    if not enabled:
        atomic.sync_file = atomic.sync_folder = lambda path: None
    try:
        yield
    finally:
        atomic.sync_file, atomic.sync_folder = saved


def alternating(repeats: int, measure) -> dict[bool, float]:
    """Median seconds of measure(flushed) for flushed True and False, alternating."""
    times = {True: [], False: []}
    for _ in range(repeats):
        for flushed in (True, False):
            with flushes(flushed):
                tic = time.perf_counter()
                measure(flushed)
                times[flushed].append(time.perf_counter() - tic)
    return {flushed: statistics.median(values) for flushed, values in times.items()}


def checkpoint_costs(folder: str, repeats: int) -> None:
    rng = np.random.default_rng(0)
    print("| checkpoint | with fsync | without | fsync costs | flushed MB/s |")
    print("|---|---|---|---|---|")
    with WorkDir(os.path.join(folder, "work"), {"fingerprints": {}}, resume=False) as work:
        for mib in CHECKPOINT_MIB:
            states = {"w": rng.standard_normal(mib * 2**18).astype(np.float32)}
            positions = iter(range(1, 10**6))

            def save(flushed, states=states, positions=positions):
                work.save_checkpoint(range(0, 2), next(positions), states, {"x": np.zeros(2)})

            times = alternating(repeats, save)
            extra = times[True] - times[False]
            print(f"| {mib} MiB | {times[True] * 1e3:.1f} ms | {times[False] * 1e3:.1f} ms | "
                  f"{extra * 1e3:.1f} ms | {mib * 2**20 / 1e6 / times[True]:.0f} |")


def run_arrays(models: int, examples: int, test: int, epochs: int, classes: int):
    """save_run's arguments for a run of these sizes (random contents)."""
    rng = np.random.default_rng(0)
    bits = lambda *shape: rng.integers(0, 2, shape, dtype=np.uint8).view(bool)  # noqa: E731
    arrays = {"masks": bits(models, examples), "correct_train": bits(models, examples),
              "correct_test": bits(models, test),
              "margins": rng.integers(-3000, 3000, (models, examples), dtype=np.int16)}
    per_example = {name: rng.random((epochs, examples)) for name in (
        "memorization_by_epoch", "memorization_se_by_epoch", "threshold_pvalue_by_epoch")}
    scores = {**per_example, "memorized_fdr_by_epoch": bits(epochs, examples),
              "heldout_prob_sum": rng.random((examples, classes)),
              "heldout_votes": rng.random((examples, classes)),
              "margin_sums": rng.integers(0, 2**40, (epochs, 4, examples)),
              "train_acc": rng.random((epochs, models)), "labels": np.arange(examples)}
    correct = {"train": bits(epochs, models, examples), "test": bits(epochs, models, test)}
    return {"models": models}, {}, arrays, scores, correct


def evict(path: str) -> None:
    """Drop the (clean) pages of every file of `path` from the page cache."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_dir_costs(folder: str, repeats: int) -> None:
    print("| run directory | bytes | save_run with fsync | without | fsync costs | check, cached "
          "| check, from the disk |")
    print("|---|---|---|---|---|---|---|")
    path = os.path.join(folder, "run")
    for label, *sizes in RUN_SIZES:
        arguments = run_arrays(*sizes)
        times = alternating(max(1, repeats // 2) if sizes[0] > 100 else repeats,
                            lambda flushed, arguments=arguments: save_run(path, *arguments))
        recorded = read_record(path, "config.json")[manifest.RECORD]
        total = sum(entry["bytes"] for entry in recorded.values())
        checks = {}
        for cached in (True, False):
            seconds = []
            for _ in range(repeats):
                if not cached:
                    evict(path)
                tic = time.perf_counter()
                manifest.check(path, recorded)
                seconds.append(time.perf_counter() - tic)
            checks[cached] = statistics.median(seconds)
        print(f"| {label} | {total:,} | {times[True]:.2f} s | {times[False]:.2f} s | "
              f"{times[True] - times[False]:.2f} s | {checks[True]:.2f} s | "
              f"{checks[False]:.2f} s |")


def default_run_costs(folder: str) -> None:
    """The default run with every flush timed."""
    from jaxmem import cli

    spent = {"calls": 0, "seconds": 0.0}
    saved = atomic.sync_file, atomic.sync_folder

    def timing(sync):
        def timed(path):
            tic = time.perf_counter()
            sync(path)
            spent["calls"] += 1
            spent["seconds"] += time.perf_counter() - tic
        return timed

    atomic.sync_file, atomic.sync_folder = map(timing, saved)
    try:
        tic = time.perf_counter()
        status = cli.main([f"--out={os.path.join(folder, 'default')}", "--no-progress"])
        wall = time.perf_counter() - tic
    finally:
        atomic.sync_file, atomic.sync_folder = saved
    print(f"default run (exit {status}): {spent['calls']} flushes took {spent['seconds']:.2f} s "
          f"of its {wall:.0f} s ({100 * spent['seconds'] / wall:.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="where to write (the disk to measure)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-run", action="store_true", help="skip the default run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="storage-costs-") as folder:
        checkpoint_costs(folder, args.repeats)
        print()
        run_dir_costs(folder, args.repeats)
        if not args.skip_run:
            print()
            default_run_costs(folder)


if __name__ == "__main__":
    main()
