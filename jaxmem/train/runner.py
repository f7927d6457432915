"""One ensemble run, from a Config to a run directory (what `experiments/run.py` calls)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import jax
import numpy as np

from jaxmem import data, models
from jaxmem.analysis import scores as scores_lib
from jaxmem.analysis.run_io import save_run
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.train import lowering
from jaxmem.train.loop import EnsembleResult, train_ensemble

VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "jaxmem")


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


def run(config: Config, out: str, overwrite: bool = False, progress: bool = True) -> str:
    """Train the ensemble described by config and write the run directory `out`."""
    check_output_dir(out, overwrite)
    lowering.resolve(config.conv_impl, config.ensemble)  # bad names fail before any work
    models.create(config.arch, 2, dtype=config.dtype)
    started = time.perf_counter()
    dataset = data.load(config.dataset, config.data_dir)
    result = train_ensemble(config, dataset, progress=progress)
    conv_impl, ensemble = lowering.resolve(config.conv_impl, config.ensemble)
    record = {
        **config.to_dict(),
        "resolved": {"conv_impl": conv_impl, "ensemble": ensemble},
        "dataset_name": dataset.name,
        "num_classes": dataset.num_classes,
        "image_shape": list(dataset.image_shape),
        "num_train": dataset.num_train,
        "num_test": dataset.num_test,
        "num_params": models.param_count(config.arch, dataset.num_classes, dataset.image_shape),
        "versions": library_versions(),
        "backend": jax.default_backend(),
        "devices": result.devices,
    }
    scores = score_arrays(result, dataset, config)
    metrics = summary_metrics(result, scores, config, time.perf_counter() - started)
    save_run(out, record, metrics,
             {"masks": result.masks, "correct_train": result.correct_train[-1],
              "correct_test": result.correct_test[-1]},
             scores, {"train": result.correct_train, "test": result.correct_test})
    return out


def score_arrays(result: EnsembleResult, dataset, config: Config) -> dict[str, np.ndarray]:
    """scores.npz contents: the estimator at every evaluated epoch plus per-model accuracies."""
    masks = result.masks
    in_count, out_count = scores_lib.membership_counts(masks)
    in_correct, out_correct = scores_lib.correct_counts(masks, result.correct_train)
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
        "labels": dataset.y_train,
        "test_labels": dataset.y_test,
        "in_count": in_count,
        "out_count": out_count,
        "low_count": by_epoch["low_count"],
        "original_index": np.asarray(dataset.original_index),
        "model_indices": result.model_indices,
    }


def summary_metrics(result: EnsembleResult, scores, config: Config, wall: float) -> dict:
    num_models, num_train = result.masks.shape
    examples_trained = int(result.masks.sum()) * config.epochs
    examples_evaluated = num_models * (num_train + result.correct_test.shape[-1]) * len(
        result.epochs)
    return {
        "memorized_count": int(scores_lib.memorized_count(scores["memorization"],
                                                          config.threshold)),
        "memorized_count_by_epoch": [int(c) for c in scores_lib.memorized_count(
            scores["memorization_by_epoch"], config.threshold)],
        "threshold": config.threshold,
        "low_count_examples": int(scores["low_count"].sum()),
        "mean_memorization": (float(np.nanmean(scores["memorization"]))
                              if not scores["low_count"].all() else None),
        "train_acc": float(scores["train_acc"][-1].mean()),
        "heldout_acc": float(scores["heldout_acc"][-1].mean()),
        "test_acc": float(scores["test_acc"][-1].mean()),
        "num_models": num_models,
        "wall_time_s": wall,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "train_model_examples_per_s": examples_trained / max(result.train_seconds, 1e-9),
        "eval_model_examples_per_s": examples_evaluated / max(result.eval_seconds, 1e-9),
        "seconds_per_model": wall / num_models,
        "models_per_hour": 3600.0 * num_models / max(wall, 1e-9),
        "devices": result.devices,
    }
