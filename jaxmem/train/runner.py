"""One ensemble run, from a Config to a run directory (what `experiments/run.py` calls).

In a multi-process job (`jax.distributed`), every process trains its own contiguous share of
the models into a part directory, and process 0 merges the parts into the run directory.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import time

import jax
import numpy as np

from jaxmem import data, models
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.masks import run_masks
from jaxmem.rundir import DataInfo, check_output_dir, merge_runs, wait_for_parts, write_run
from jaxmem.rundir.fingerprint import dataset_fingerprints, result_fingerprints
from jaxmem.train import lowering
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.loop import train_ensemble

VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "jaxmem")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def work_dir_of(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + ".partial"


def run(config: Config, out: str, overwrite: bool = False, resume: bool = False,
        progress: bool = True) -> str:
    """Train the ensemble described by config and write the run directory `out`.

    resume: continue the interrupted run whose work directory `<out>.partial` exists.
    """
    if overwrite and resume:
        raise UserError("--resume and --overwrite exclude each other")
    check_output_dir(out, overwrite)
    lowering.resolve(config.conv_impl, config.ensemble)  # bad names fail before any work
    models.create(config.arch, 2, dtype=config.dtype)
    if jax.process_count() > 1:
        return run_multiprocess(config, out, overwrite, resume, progress)
    return train_and_evaluate(config, out, overwrite, resume, progress)


def train_and_evaluate(config: Config, out: str, overwrite: bool = False,
                       resume: bool = False, progress: bool = True) -> str:
    """The whole run on this process's devices, top to bottom as the data flows: dataset ->
    masks -> waves of models trained epoch by epoch, evaluated at chosen epochs -> counts and
    scores -> the run directory `out`. Work in progress lives in `<out>.partial`."""
    started = time.perf_counter()
    dataset = data.load(config.dataset, config.data_dir)
    info = data_info(dataset)
    masks = run_masks(config, dataset.num_train)
    if overwrite:
        shutil.rmtree(work_dir_of(out), ignore_errors=True)
    work = WorkDir(work_dir_of(out), {"settings": config.to_dict(), "fingerprints": {
        **info.fingerprints, **result_fingerprints(masks, config.to_dict())}}, resume)
    result = train_ensemble(config, dataset, masks, progress=progress, work=work)
    write_run(out, config.to_dict(), info, result, time.perf_counter() - started,
              provenance(config, info))
    work.remove()
    return out


def data_info(dataset) -> DataInfo:
    return DataInfo(dataset.name, dataset.num_classes, tuple(dataset.image_shape),
                    dataset.y_train, dataset.y_test, np.asarray(dataset.original_index),
                    dataset_fingerprints(dataset))


def provenance(config: Config, info: DataInfo) -> dict:
    """How this process computes the run: recorded in config.json beside the settings."""
    conv_impl, ensemble = lowering.resolve(config.conv_impl, config.ensemble)
    return {"resolved": {"conv_impl": conv_impl, "ensemble": ensemble},
            "num_params": models.param_count(config.arch, info.num_classes, info.image_shape),
            "versions": library_versions(), "backend": jax.default_backend()}


def run_multiprocess(config: Config, out: str, overwrite: bool, resume: bool,
                     progress: bool) -> str:
    """Each process trains a contiguous share of the models into `<out>.parts/part-P`;
    process 0 waits for every part (a shared filesystem is assumed) and merges them."""
    count, me = jax.process_count(), jax.process_index()
    indices = config.model_indices()
    bounds = np.linspace(indices.start, indices.stop, count + 1).round().astype(int)
    parts_dir = os.path.abspath(out).rstrip(os.sep) + ".parts"
    parts = [os.path.join(parts_dir, f"part-{p:03d}") for p in range(count)]
    mine = dataclasses.replace(config, model_range=f"{bounds[me]}:{bounds[me + 1]}")
    if not (resume and os.path.exists(os.path.join(parts[me], "metrics.json"))):
        check_output_dir(parts[me], overwrite)
        train_and_evaluate(mine, parts[me], overwrite, resume, progress and me == 0)
    if me == 0:
        wait_for_parts(parts)
        merge_runs(parts, out, overwrite=True, model_range=config.model_range)
    return out
