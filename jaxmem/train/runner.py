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
from jaxmem.analysis import scores as scores_lib
from jaxmem.analysis.run_io import save_run
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.fingerprint import dataset_fingerprints, result_fingerprints
from jaxmem.train import lowering
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.loop import EnsembleResult, train_ensemble
from jaxmem.train.masks import subset_masks

VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "jaxmem")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a run directory records about its dataset (all a merge needs, no images)."""

    name: str
    num_classes: int
    image_shape: tuple[int, ...]
    labels: np.ndarray
    test_labels: np.ndarray
    original_index: np.ndarray
    fingerprints: dict[str, str]

    @classmethod
    def of(cls, dataset) -> DataInfo:
        return cls(dataset.name, dataset.num_classes, tuple(dataset.image_shape),
                   dataset.y_train, dataset.y_test, np.asarray(dataset.original_index),
                   dataset_fingerprints(dataset))


def check_output_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"output directory {out!r} already exists; pass --overwrite to replace it")


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
    return run_local(config, out, overwrite, resume, progress)


def run_local(config: Config, out: str, overwrite: bool, resume: bool, progress: bool) -> str:
    """`run` on this process's devices only."""
    started = time.perf_counter()
    dataset = data.load(config.dataset, config.data_dir, download=config.download)
    masks = subset_masks(config.seed, config.model_indices(), dataset.num_train,
                         config.subset_ratio)
    fingerprints = {**dataset_fingerprints(dataset), **result_fingerprints(masks,
                                                                           config.to_dict())}
    if overwrite:
        shutil.rmtree(work_dir_of(out), ignore_errors=True)
    work = WorkDir(work_dir_of(out), {"settings": config.to_dict(),
                                      "fingerprints": fingerprints}, resume)
    result = train_ensemble(config, dataset, progress=progress, work=work)
    write_run(out, config, DataInfo.of(dataset), result, time.perf_counter() - started)
    work.remove()
    return out


def run_multiprocess(config: Config, out: str, overwrite: bool, resume: bool,
                     progress: bool) -> str:
    """Each process trains a contiguous share of the models into `<out>.parts/part-P`;
    process 0 waits for every part (a shared filesystem is assumed) and merges them."""
    from jaxmem.train.merge import merge_runs, wait_for_parts

    count, me = jax.process_count(), jax.process_index()
    indices = config.model_indices()
    bounds = np.linspace(indices.start, indices.stop, count + 1).round().astype(int)
    parts_dir = os.path.abspath(out).rstrip(os.sep) + ".parts"
    parts = [os.path.join(parts_dir, f"part-{p:03d}") for p in range(count)]
    mine = dataclasses.replace(config, model_range=f"{bounds[me]}:{bounds[me + 1]}")
    if not (resume and os.path.exists(os.path.join(parts[me], "metrics.json"))):
        check_output_dir(parts[me], overwrite)
        run_local(mine, parts[me], overwrite, resume, progress and me == 0)
    if me == 0:
        wait_for_parts(parts)
        merge_runs(parts, out, overwrite=True, model_range=config.model_range)
    return out


def write_run(out: str, config: Config, info: DataInfo, result: EnsembleResult,
              wall: float) -> None:
    """The run directory of `result` (also used to write merged parts)."""
    conv_impl, ensemble = lowering.resolve(config.conv_impl, config.ensemble)
    record = {
        **config.to_dict(),
        "resolved": {"conv_impl": conv_impl, "ensemble": ensemble},
        "dataset_name": info.name,
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "num_train": len(info.labels),
        "num_test": len(info.test_labels),
        "num_params": models.param_count(config.arch, info.num_classes, info.image_shape),
        "models_trained": len(result.model_indices),
        "fingerprints": {**info.fingerprints,
                         **result_fingerprints(result.masks, config.to_dict())},
        "versions": library_versions(),
        "backend": jax.default_backend(),
        "devices": result.devices,
    }
    scores = score_arrays(result, info, config)
    metrics = summary_metrics(result, scores, config, wall)
    save_run(out, record, metrics,
             {"masks": result.masks, "correct_train": result.correct_train[-1],
              "correct_test": result.correct_test[-1]},
             scores, {"train": result.correct_train, "test": result.correct_test})


def score_arrays(result: EnsembleResult, info: DataInfo, config: Config) -> dict:
    """scores.npz contents: the estimator at every evaluated epoch (over the models that did
    not diverge) plus per-model accuracies."""
    keep = ~result.diverged
    masks = result.masks
    in_count, out_count = scores_lib.membership_counts(masks[keep])
    in_correct, out_correct = scores_lib.correct_counts(masks[keep],
                                                        result.correct_train[:, keep])
    by_epoch = scores_lib.from_counts(in_correct, out_correct, in_count, out_count,
                                      config.min_count)
    own = (result.correct_train & masks).sum(-1) / np.maximum(masks.sum(-1), 1)  # [E, K]
    held = (result.correct_train & ~masks).sum(-1) / np.maximum((~masks).sum(-1), 1)
    return {
        "memorization": by_epoch["memorization"][-1],
        "memorization_se": by_epoch["memorization_se"][-1],
        "memorization_by_epoch": by_epoch["memorization"],
        "memorization_se_by_epoch": by_epoch["memorization_se"],
        "epochs": np.asarray(result.epochs),
        "train_acc": own,
        "heldout_acc": held,
        "test_acc": result.correct_test.mean(-1),
        "train_loss": result.train_loss,
        "train_batch_acc": result.train_batch_acc,
        "labels": info.labels,
        "test_labels": info.test_labels,
        "in_count": in_count,
        "out_count": out_count,
        "low_count": by_epoch["low_count"],
        "original_index": info.original_index,
        "model_indices": result.model_indices,
        "diverged": result.diverged,
    }


def summary_metrics(result: EnsembleResult, scores, config: Config, wall: float) -> dict:
    num_models, num_train = result.masks.shape
    examples_trained = int(result.masks.sum()) * config.epochs
    examples_evaluated = num_models * (num_train + result.correct_test.shape[-1]) * len(
        result.epochs)
    keep = ~result.diverged
    scored = not scores["low_count"].all()
    peaks = [p for p in result.peak_memory_bytes if p is not None]
    return {
        "memorized_count": int(scores_lib.memorized_count(scores["memorization"],
                                                          config.threshold)),
        "memorized_count_by_epoch": [int(c) for c in scores_lib.memorized_count(
            scores["memorization_by_epoch"], config.threshold)],
        "threshold": config.threshold,
        "min_count": config.min_count,
        "low_count_examples": int(scores["low_count"].sum()),
        "mean_memorization": float(np.nanmean(scores["memorization"])) if scored else None,
        "max_memorization_se": float(np.nanmax(scores["memorization_se"])) if scored else None,
        "train_acc": float(scores["train_acc"][-1][keep].mean()) if keep.any() else None,
        "heldout_acc": float(scores["heldout_acc"][-1][keep].mean()) if keep.any() else None,
        "test_acc": float(scores["test_acc"][-1][keep].mean()) if keep.any() else None,
        "num_models": num_models,
        "diverged_models": [int(k) for k in result.model_indices[result.diverged]],
        "wall_time_s": wall,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "train_model_examples_per_s": examples_trained / max(result.train_seconds, 1e-9),
        "eval_model_examples_per_s": examples_evaluated / max(result.eval_seconds, 1e-9),
        "seconds_per_model": wall / num_models,
        "models_per_hour": 3600.0 * num_models / max(wall, 1e-9),
        "peak_memory_bytes_per_wave": result.peak_memory_bytes,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "devices": result.devices,
        "num_devices": len(result.devices),
    }
