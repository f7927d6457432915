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

from jaxmem import canaries, data, models
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.masks import run_masks
from jaxmem.rundir import (
    DataInfo,
    Run,
    check_output_dir,
    load_run,
    merge_runs,
    wait_for_parts,
    write_run,
)
from jaxmem.rundir.fingerprint import (
    REPORT_SETTINGS,
    check_same,
    dataset_fingerprints,
    result_fingerprints,
    settings_hash,
)
from jaxmem.train import lowering, pilot, preemption
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.loop import train_ensemble
from jaxmem.train.preemption import Preempted

VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "jaxmem")


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


def grow_part_of(out: str) -> str:
    """Where `--grow` trains the models it adds to `out` (a part, merged in at the end)."""
    return os.path.abspath(out).rstrip(os.sep) + ".grow"


def work_dir_for(out: str, grow: bool) -> str:
    """The work directory a run of `out` keeps its finished work in (this process's)."""
    if grow:
        return work_dir_of(grow_part_of(out))
    if jax.process_count() > 1:
        return work_dir_of(part_of(out, jax.process_index()))
    return work_dir_of(out)


def part_of(out: str, process: int) -> str:
    """The part directory of one process of a multi-process run."""
    return os.path.join(os.path.abspath(out).rstrip(os.sep) + ".parts", f"part-{process:03d}")


def run(config: Config, out: str, overwrite: bool = False, resume: bool = False,
        progress: bool = True, grow: bool = False, sources: dict[str, str] | None = None
        ) -> str:
    """Train the ensemble described by config and write the run directory `out`.

    resume: continue the interrupted run whose work directory `<out>.partial` exists.
    grow: `out` is a finished run of the same settings with fewer models: train only the
    models it lacks and add them to it (see `grow_run`).
    sources: where each setting came from (flag, recipe, default), recorded in config.json;
    where the recipe chose the epochs, a pilot chooses them instead (train/pilot.py).
    """
    provenance_extra = {"setting_sources": sources or {}}
    if overwrite and resume:
        raise UserError("--overwrite excludes --resume (--overwrite starts again, --resume "
                        "continues)")
    # bad names fail before any work
    lowering.resolve(config.conv_impl, config.ensemble, arch=config.arch)
    models.create(config.arch, 2, dtype=config.dtype)
    if config.until_se is not None and (config.model_range or jax.process_count() > 1):
        raise UserError("--until-se chooses K from the scores of all models, which one part "
                        "does not see; merge the parts, then add models to the merged run "
                        "with --grow --until-se")
    if grow:
        config = pilot.grown_length(config, sources or {}, out)
        return grow_run(config, out, resume, progress, provenance_extra, overwrite)
    if pilot.wanted(config, sources or {}):  # it checks `out` itself
        return pilot.run_with_pilot(config, sources, out, overwrite, resume, progress,
                                    train_and_evaluate)
    # --resume continues an interrupted run, one started with --overwrite too (whose old run
    # directory stays until the new one is complete)
    check_output_dir(out, overwrite or resume and os.path.isdir(work_dir_of(out)))
    if jax.process_count() > 1:
        return run_multiprocess(config, out, overwrite, resume, progress, provenance_extra)
    return train_and_evaluate(config, out, overwrite, resume, progress,
                              recorded=provenance_extra)


def train_and_evaluate(config: Config, out: str, overwrite: bool = False,
                       resume: bool = False, progress: bool = True, prior: Run | None = None,
                       recorded: dict | None = None) -> str:
    """The whole run on this process's devices, top to bottom as the data flows: dataset ->
    masks -> waves of models trained epoch by epoch, evaluated at chosen epochs -> counts and
    scores -> the run directory `out`. Work in progress lives in `<out>.partial`.

    prior: a finished run these models will be added to (its dataset and settings must match;
    with --until-se its models count towards the target). recorded: more entries for
    config.json (e.g. where each setting came from)."""
    started, started_at = time.perf_counter(), time.time()
    loaded = data.load_for(config)
    dataset, planted = canaries.plant(loaded, config.canaries, config.seed)
    info = data_info(dataset, planted, dataset_fingerprints(loaded))
    if prior is not None:
        check_same(prior.config["fingerprints"], {
            **info.fingerprints, "settings": settings_hash(config.to_dict())},
            f"refusing to add models to {prior.path} (only --num-models, --until-se and "
            "execution settings may change)")
    masks = run_masks(config, dataset.num_train)
    with WorkDir(work_dir_of(out), {"settings": config.to_dict(), "fingerprints": {
            **info.fingerprints, **result_fingerprints(masks, config.to_dict())}}, resume,
            overwrite) as work:
        result = train_ensemble(config, dataset, masks, progress=progress, work=work,
                                prior=prior, canary_index=planted.index, out=out)
        write_run(out, config.to_dict(), info, result, time.perf_counter() - started,
                  {**provenance(config, info), **(recorded or {})}, [[started_at, time.time()]])
        work.remove()
    return out


def grow_run(config: Config, out: str, resume: bool, progress: bool,
             recorded: dict | None = None, overwrite: bool = False) -> str:
    """Add models to the finished run `out` (models 0..K_old-1) up to config.num_models, or
    with --until-se until every standard error is below the target: only the new models are
    trained (as a part in `<out>.grow`, resumable), then merged into `out`. Model k depends on
    (seed, k) alone, so the result equals a fresh run with the larger K. An interrupted grow
    is continued with `resume` or discarded with `overwrite` (`out` itself is kept either
    way)."""
    if not os.path.isdir(out):
        raise UserError(f"--grow: there is no run directory {out!r} to add models to")
    existing = load_run(out, all_models=True)
    have = len(existing.model_indices)
    if not np.array_equal(existing.model_indices, np.arange(have)):
        raise UserError(f"--grow: {out} does not hold models 0..{have - 1}")
    if config.num_models <= have:
        raise UserError(f"--grow: {out} already holds {have} models; give --num-models above "
                        "that")
    part = grow_part_of(out)
    if not os.path.exists(os.path.join(part, "metrics.json")):
        train_and_evaluate(dataclasses.replace(config, model_range=f"{have}:{config.num_models}"),
                           part, overwrite=overwrite, resume=resume, progress=progress,
                           prior=existing, recorded=recorded)
    merge_runs([out, part], out, overwrite=True,  # report with the settings given now
               report={name: getattr(config, name) for name in REPORT_SETTINGS})
    shutil.rmtree(part)
    return out


def data_info(dataset, planted: canaries.Canaries, fingerprints: dict[str, str]) -> DataInfo:
    """The run's record of its dataset: labels as trained on (canaries planted), and the
    fingerprints of the dataset as loaded, before the canaries (the settings cover those)."""
    return DataInfo(dataset.name, dataset.num_classes, tuple(dataset.image_shape),
                    dataset.y_train, dataset.y_test, np.asarray(dataset.original_index),
                    fingerprints, planted.index, planted.original_label)


def provenance(config: Config, info: DataInfo) -> dict:
    """How this process computes the run: recorded in config.json beside the settings."""
    conv_impl, ensemble = lowering.resolve(config.conv_impl, config.ensemble, arch=config.arch)
    eval_conv, eval_ensemble, eval_batch = lowering.resolve_eval(
        config.conv_impl, config.ensemble, config.eval_batch_size, arch=config.arch)
    return {"resolved": {"conv_impl": conv_impl, "ensemble": ensemble,
                         "eval_conv_impl": eval_conv, "eval_ensemble": eval_ensemble,
                         "eval_batch_size": eval_batch},
            "num_params": models.param_count(config.arch, info.num_classes, info.image_shape),
            "versions": library_versions(), "backend": jax.default_backend()}


def run_multiprocess(config: Config, out: str, overwrite: bool, resume: bool,
                     progress: bool, recorded: dict | None = None) -> str:
    """Each process trains a contiguous share of the models into `<out>.parts/part-P`, then
    waits for every part (a shared filesystem is assumed) and process 0 merges them. A process
    whose part is finished keeps waiting, so that the processes still training can agree on a
    stop with it (train/preemption.py), and stops with them."""
    count, me = jax.process_count(), jax.process_index()
    indices = config.model_indices()
    bounds = np.linspace(indices.start, indices.stop, count + 1).round().astype(int)
    parts = [part_of(out, p) for p in range(count)]
    mine = dataclasses.replace(config, model_range=f"{bounds[me]}:{bounds[me + 1]}")
    preemption.start_shared_clock()
    if not (resume and os.path.exists(os.path.join(parts[me], "metrics.json"))):
        check_output_dir(parts[me], overwrite)
        train_and_evaluate(mine, parts[me], overwrite, resume, progress and me == 0,
                           recorded=recorded)
    if not wait_for_parts(parts, stopped=preemption.agreed_stop):
        raise Preempted(f"SIGTERM received: models {bounds[me]}..{bounds[me + 1] - 1} are "
                        f"finished in {parts[me]}, the other parts are checkpointed or "
                        "finished in their own folders; "
                        "rerun the same command with --resume to continue (exit status "
                        f"{preemption.EXIT_PREEMPTED})")
    if me == 0:
        merge_runs(parts, out, overwrite=True, model_range=config.model_range)
    return out
