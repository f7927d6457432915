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

Files are written atomically (jaxmem/atomic.py), so a SIGKILL at any moment leaves a resumable
state. While a run is alive it holds `lock` in the directory: a second run on the same output
is refused.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import NamedTuple

import jax
import numpy as np

from jaxmem import atomic
from jaxmem.errors import UserError
from jaxmem.lockfile import Lock
from jaxmem.rundir.fingerprint import check_same

KEEP_CHECKPOINTS = 2
LOCK = "lock"
_FINISHED = re.compile(r"models-(\d+)-(\d+)\.npz")
_CHECKPOINT = re.compile(r"checkpoint-models-(\d+)-(\d+)")


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
        os.makedirs(path, exist_ok=True)
        self._lock = Lock(os.path.join(path, LOCK), f"another run is writing {path} (it holds "
                          "its lock); wait for it to finish or stop it first")
        try:
            self._open(record, resume, overwrite)
        except BaseException:
            self.close()
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
            with open(record_path) as f:
                saved = json.load(f)
            check_same(saved["fingerprints"], record["fingerprints"], "refusing to resume")
        else:
            atomic.write_json(record_path, record)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _matches(self, pattern: re.Pattern) -> list[tuple[str, range]]:
        found = [(name, pattern.fullmatch(name)) for name in sorted(os.listdir(self.path))]
        return [(os.path.join(self.path, name), range(int(m[1]), int(m[2])))
                for name, m in found if m]

    def finished(self) -> list[dict]:
        """The arrays of every finished wave, each with its "model_indices"."""
        waves = []
        for path, _ in self._matches(_FINISHED):
            with np.load(path) as archive:
                waves.append({key: archive[key] for key in archive.files})
        return waves

    def save_finished(self, arrays: dict) -> None:
        """A finished wave (arrays["model_indices"]: consecutive model indices); checkpoints
        whose models are now all finished are deleted."""
        models = arrays["model_indices"]
        atomic.write_npz(os.path.join(self.path, f"models-{models[0]}-{models[-1] + 1}.npz"),
                         **arrays)
        done = {int(k) for wave in self.finished() for k in wave["model_indices"]}
        for path, held in self._matches(_CHECKPOINT):
            if done.issuperset(held):
                shutil.rmtree(path, ignore_errors=True)

    def checkpoints(self) -> list[Checkpoint]:
        """Every wave in progress (its newest checkpoint)."""
        found = []
        for path, models in self._matches(_CHECKPOINT):
            steps = _steps(path)
            if steps:
                found.append(Checkpoint(os.path.join(path, f"{steps[-1]}.npz"), models,
                                        steps[-1]))
        return found

    def save_checkpoint(self, models: range, position: int, states, partial: dict) -> None:
        """The states (host arrays, one row per model of `models`) and partial results of a
        wave in progress after `position` steps, in one file."""
        path = os.path.join(self.path, f"checkpoint-models-{models.start}-{models.stop}")
        os.makedirs(path, exist_ok=True)
        leaves = jax.tree.leaves(states)
        atomic.write_npz(os.path.join(path, f"{position}.npz"),
                         **{f"state_{i}": leaf for i, leaf in enumerate(leaves)},
                         **{f"partial_{name}": value for name, value in partial.items()})
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


def _steps(path: str) -> list[int]:
    """The positions of the checkpoints in `path`, in order."""
    return sorted(int(m[1]) for m in map(re.compile(r"(\d+)\.npz").fullmatch, os.listdir(path))
                  if m)
