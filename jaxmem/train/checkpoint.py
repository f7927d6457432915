"""Nothing lost on interruption: a run's work directory `<out>.partial/`.

It holds the run's record (settings and fingerprints, checked on `--resume`), one file per
finished wave, and, for a wave in progress, checkpoints (the last 2 kept), each one file holding
the models' states and the wave's partial results (with the position inside the epoch), so a
state never lacks its results. Everything is keyed by MODEL INDEX, never by wave number:
finished files are `models-FIRST-STOP.npz` and checkpoints `checkpoint-models-FIRST-STOP/STEPS.npz`
(models FIRST..STOP-1 after STEPS optimiser steps each), so a resume may lay out its waves
differently (another wave size or device count) and still reuse every finished step. States are
saved without the padding rows of a wave, from host memory, so they restore on any layout, and
each process of a multi-process job writes its own files (orbax's checkpointer writes no host
arrays from a process other than 0).

Files are written atomically and durably (jaxmem/atomic.py: flushed to the disk before their
rename), so a SIGKILL, or a crash of the machine, at any moment leaves a resumable state. A file
that is unreadable all the same (a filesystem that lost its data, a disk error) costs only the
work in it: `--resume` continues a wave from its previous checkpoint, or trains it from the
start, and trains the models of an unreadable finished wave again, saying so in one line each;
model k is determined by (seed, k), so the result is the same. Such a file is renamed to
`NAME.unreadable` (kept for inspection, never read again). A write that fills the disk raises
`DiskFull`, which the work directory marks with where the work so far is kept, if anywhere.
While a run is alive it holds `lock` in the directory: a second run on the same output is
refused.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxmem import atomic
from jaxmem.errors import DiskFull, UserError
from jaxmem.lockfile import Lock
from jaxmem.rundir.fingerprint import check_same

KEEP_CHECKPOINTS = 2
LOCK = "lock"
_FINISHED = re.compile(r"models-(\d+)-(\d+)\.npz")
_CHECKPOINT = re.compile(r"checkpoint-models-(\d+)-(\d+)")
UNREADABLE = ".unreadable"  # the suffix an unreadable file is renamed to
# What reading a damaged .npz raises: a missing or cut zip structure, a failed CRC-32, a
# damaged .npy header inside, a missing member.
DAMAGED = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class Checkpoint(NamedTuple):
    """The newest checkpoint of a wave in progress: its models and how far they got."""

    path: str  # its file
    models: range
    position: int  # optimiser steps every one of its models has taken


class WorkDir:
    """The work directory of one run (or one part of a run), locked while in use: use as a
    context manager (or call `close()`)."""

    def __init__(self, path: str, record: dict, resume: bool, overwrite: bool = False):
        """record: {"settings": ..., "fingerprints": ...} of the run about to train.
        overwrite: discard what an interrupted run left here."""
        self.path = path
        self._whole: dict[str, tuple[int, int]] = {}  # checked checkpoints: (size, mtime_ns)
        with atomic.room_for(path, atomic.FOLDER_BYTES):
            atomic.make_folder(path)
        self._lock = Lock(os.path.join(path, LOCK), f"another run is writing {path} (it holds "
                          "its lock); wait for it to finish or stop it first")
        try:
            self._open(record, resume, overwrite)
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise

    def _open(self, record: dict, resume: bool, overwrite: bool) -> None:
        if overwrite:
            for name in os.listdir(self.path):
                if name != LOCK:
                    target = os.path.join(self.path, name)
                    (shutil.rmtree if os.path.isdir(target) else os.remove)(target)
        record_path = os.path.join(self.path, "record.json")
        if os.path.exists(record_path):
            if not resume:
                raise UserError(f"an interrupted run was found in {self.path}; pass --resume to "
                                "continue it, or --overwrite to start it again")
            if glob.glob(os.path.join(self.path, "*wave-*")):
                raise UserError(f"{self.path} was written by an older jaxmem (work kept by wave "
                                "number); start again with --overwrite")
            try:
                with open(record_path) as f:
                    saved = json.load(f)["fingerprints"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UserError(f"{record_path} is unreadable ({error}), so the work in "
                                f"{self.path} cannot be checked against this run; start again "
                                "with --overwrite") from None
            check_same(saved, record["fingerprints"], "refusing to resume")
        else:
            unrecorded = [name for name in os.listdir(self.path) if name != LOCK]
            if unrecorded:  # e.g. a checkpoint written by a run whose folder was removed
                raise UserError(f"{self.path} holds {', '.join(sorted(unrecorded)[:3])} but no "
                                "record.json, so that work cannot be checked against this run; "
                                "start again with --overwrite")
            atomic.write_json(record_path, record)

    def close(self) -> None:
        self._lock.release()

    def holds_work(self) -> bool:
        """Is there a finished wave or a checkpoint here for a resume to continue?"""
        return bool(self._matches(_FINISHED)) or any(
            _steps(path) for path, _ in self._matches(_CHECKPOINT))

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, DiskFull) and error.kept is None and self.holds_work():
            error.kept = self.path
        self.close()

    def _matches(self, pattern: re.Pattern) -> list[tuple[str, range]]:
        found = [(name, pattern.fullmatch(name)) for name in sorted(os.listdir(self.path))]
        return [(os.path.join(self.path, name), range(int(m[1]), int(m[2])))
                for name, m in found if m]

    def finished(self) -> Iterator[dict]:
        """The arrays of every readable finished wave, each with its "model_indices", read one
        file at a time. An unreadable one is set aside with a warning naming it: its models
        train again."""
        for path, models in self._matches(_FINISHED):
            try:
                with np.load(path) as archive:  # reading a member whole checks its CRC-32
                    arrays = {key: archive[key] for key in archive.files}
                if list(arrays["model_indices"]) != list(models):
                    raise ValueError(f"it holds models {arrays['model_indices'].tolist()}")
            except DAMAGED as error:
                self._set_aside([(path, damage(path, error))],
                                f"models {_span(models)} train again (each model is "
                                "determined by the seed: the result is the same)")
                continue
            yield arrays

    def save_finished(self, arrays: dict) -> None:
        """A finished wave (arrays["model_indices"]: consecutive model indices); checkpoints
        whose models are now all finished (as the finished files' names say) are deleted."""
        models = arrays["model_indices"]
        atomic.write_npz(os.path.join(self.path, f"models-{models[0]}-{models[-1] + 1}.npz"),
                         **arrays)
        done = {k for _, held in self._matches(_FINISHED) for k in held}
        for path, held in self._matches(_CHECKPOINT):
            if done.issuperset(held):
                shutil.rmtree(path, ignore_errors=True)

    def checkpoints(self) -> list[Checkpoint]:
        """Every wave in progress: its newest readable checkpoint. Unreadable newer ones are
        set aside with one line saying where the wave continues from instead."""
        found = []
        for folder, models in self._matches(_CHECKPOINT):
            unreadable, newest = [], None
            for steps in reversed(_steps(folder)):
                path = os.path.join(folder, f"{steps}.npz")
                problem = self._unreadable(path)
                if problem is None:
                    newest = Checkpoint(path, models, steps)
                    break
                unreadable.append((path, problem))
            if unreadable:
                self._set_aside(unreadable, f"models {_span(models)} train from the start"
                                if newest is None else
                                f"models {_span(models)} continue from the previous "
                                f"checkpoint, {steps}.npz ({steps} steps)")
            found += [newest] if newest else []
        return found

    def _unreadable(self, path: str) -> str | None:
        """Why the checkpoint `path` cannot be read (None: it can; every member is read and
        checked against its CRC-32 once per process)."""
        stat = os.stat(path)
        if self._whole.get(path) == (stat.st_size, stat.st_mtime_ns):
            return None
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except DAMAGED as error:
            return damage(path, error)
        if bad is not None:
            return f"its member {bad} is damaged"
        self._whole[path] = (stat.st_size, stat.st_mtime_ns)
        return None

    def _set_aside(self, unreadable: list[tuple[str, str]], instead: str) -> None:
        """Rename unreadable files to NAME.unreadable, so that no resume reads them again, and
        say so in one line."""
        for path, _ in unreadable:
            with contextlib.suppress(OSError):  # left in place, it is found unreadable again
                os.replace(path, path + UNREADABLE)
        what = "; ".join(f"{path} is unreadable ({problem})" for path, problem in unreadable)
        tqdm.write(f"resume: {what}; {instead}", file=sys.stderr)

    def save_checkpoint(self, models: range, position: int, states, partial: dict) -> None:
        """The states (host arrays, one row per model of `models`) and partial results of a
        wave in progress after `position` steps, in one file."""
        path = os.path.join(self.path, f"checkpoint-models-{models.start}-{models.stop}")
        file = os.path.join(path, f"{position}.npz")
        arrays = {**{f"state_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(states))},
                  **{f"partial_{name}": value for name, value in partial.items()}}
        with atomic.room_for(path, atomic.FOLDER_BYTES):
            atomic.make_folder(path)
        atomic.write_npz(file, **arrays)
        stat = os.stat(file)
        self._whole[file] = (stat.st_size, stat.st_mtime_ns)  # written whole, just now
        for old in _steps(path)[:-KEEP_CHECKPOINTS]:
            os.remove(os.path.join(path, f"{old}.npz"))

    def restore_checkpoint(self, checkpoint: Checkpoint, states_template,
                           partial_names) -> tuple:
        """(states, partial) of `checkpoint` as host arrays: states in the structure of
        `states_template`, partial the arrays named `partial_names`."""
        with np.load(checkpoint.path) as archive:
            leaves, structure = jax.tree.flatten(states_template)
            states = jax.tree.unflatten(structure, [archive[f"state_{i}"]
                                                    for i in range(len(leaves))])
            return states, {name: archive[f"partial_{name}"] for name in partial_names}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def damage(path: str, error: Exception) -> str:
    """What is wrong with a file that failed to read, in a few words."""
    size = os.path.getsize(path)
    return "empty" if size == 0 else f"{size:,} bytes: {error}"


def _span(models: range) -> str:
    return f"{models.start}..{models.stop - 1}"


def _steps(path: str) -> list[int]:
    """The positions of the checkpoints in `path`, in order."""
    return sorted(int(m[1]) for m in map(re.compile(r"(\d+)\.npz").fullmatch, os.listdir(path))
                  if m)
