"""Nothing lost on interruption: a run's work directory `<out>.partial/`.

It holds the run's record (settings and fingerprints, checked on `--resume`), one file per
finished wave, and, for the wave in progress, orbax checkpoints (the last 2 kept), each holding
the ensemble state and the wave's partial results as two items of one checkpoint, so a state
never lacks its results. Files are written atomically (jaxmem/atomic.py) and orbax commits a
checkpoint only once complete, so a SIGKILL at any moment leaves a resumable state.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmem import atomic
from jaxmem.errors import UserError
from jaxmem.rundir.fingerprint import check_same

KEEP_CHECKPOINTS = 2


class WorkDir:
    """The work directory of one run (or one part of a run)."""

    def __init__(self, path: str, record: dict, resume: bool):
        """record: {"settings": ..., "fingerprints": ...} of the run about to train."""
        self.path = path
        record_path = os.path.join(path, "record.json")
        if os.path.exists(record_path):
            if not resume:
                raise UserError(f"an interrupted run was found in {path}; pass --resume to "
                                "continue it, or --overwrite to start again")
            with open(record_path) as f:
                saved = json.load(f)
            check_same(saved["fingerprints"], record["fingerprints"], "refusing to resume")
        else:
            os.makedirs(path, exist_ok=True)
            atomic.write_json(record_path, record)

    def _wave_file(self, wave: int) -> str:
        return os.path.join(self.path, f"wave-{wave:05d}.npz")

    def load_wave(self, wave: int) -> dict | None:
        """The finished wave's arrays, or None."""
        if not os.path.exists(self._wave_file(wave)):
            return None
        with np.load(self._wave_file(wave)) as archive:
            return {key: archive[key] for key in archive.files}

    def save_wave(self, wave: int, arrays: dict) -> None:
        atomic.write_npz(self._wave_file(wave), **arrays)
        shutil.rmtree(self._checkpoint_dir(wave), ignore_errors=True)

    def _checkpoint_dir(self, wave: int) -> str:
        return os.path.join(self.path, f"checkpoint-wave-{wave:05d}")

    def _manager(self, wave: int) -> ocp.CheckpointManager:
        # Each process checkpoints only its own models (its own work directory): no
        # cross-process barriers, this process is its own primary host.
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=KEEP_CHECKPOINTS, enable_async_checkpointing=False, create=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"p{me}"))
        return ocp.CheckpointManager(os.path.abspath(self._checkpoint_dir(wave)), options=options)

    def save_epoch(self, wave: int, epochs_done: int, states, partial: dict) -> None:
        """After `epochs_done` epochs of `wave`: the state and the partial results, together."""
        os.makedirs(self._checkpoint_dir(wave), exist_ok=True)
        with self._manager(wave) as manager:
            manager.save(epochs_done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_savable(states)),
                partial=ocp.args.StandardSave(partial)))
            manager.wait_until_finished()

    def restore_epoch(self, wave: int, template, partial_template: dict):
        """(epochs_done, states, partial) of the newest checkpoint of `wave`, or None.
        template: states of the same structure and sharding (e.g. freshly initialised);
        partial_template: the wave's result arrays (their structure, shapes and dtypes)."""
        if not os.path.isdir(self._checkpoint_dir(wave)):
            return None
        with self._manager(wave) as manager:
            step = manager.latest_step()
            if step is None:
                return None
            if jax.process_count() == 1:
                target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
                    leaf.shape, leaf.dtype, sharding=leaf.sharding), template)
            else:
                target = jax.device_get(template)
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                partial=ocp.args.StandardRestore(partial_template)))
            states = jax.tree.map(lambda leaf, like: jax.device_put(leaf, like.sharding),
                                  restored.state, template)
        partial = {key: np.asarray(value) for key, value in restored.partial.items()}
        return step, states, partial

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _savable(states):
    """Orbax writes sharded arrays directly in a single process; in a multi-process job each
    process's models live on its own devices only (host-local arrays, which orbax refuses), so
    they are copied to host memory first."""
    return states if jax.process_count() == 1 else jax.device_get(states)
