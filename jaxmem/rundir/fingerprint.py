"""Provenance fingerprints: hashes of what a run's results depend on.

A run records the hash of its training and test images and labels (in the order used), of its
mask matrix, and of the settings that change results. Resume, merge and `load_run(...,
dataset=...)` compare them and refuse a mismatch, naming the fingerprint that differs.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jaxmem.errors import UserError

# Settings that change no result (only speed, placement or where things are; the pilot only
# chooses the epochs, which are recorded themselves).
EXECUTION_SETTINGS = ("data_dir", "download", "eval_batch_size", "models_per_wave", "conv_impl",
                      "ensemble", "model_range", "checkpoint_seconds", "host_memory", "pilot")
# Settings that change only what a run reports about itself (its warnings), no score.
REPORT_SETTINGS = ("fit_threshold", "null_permutations", "fdr")
# Settings that decide which models a run holds and keeps, not what any model computes: model k
# is the same model in a run of 500 and of 1,000. The settings fingerprint leaves them out so
# that parts and grown runs of one ensemble combine; the masks fingerprint and the merge's
# coverage checks account for them.
ENSEMBLE_SETTINGS = ("num_models", "until_se", "drop_diverged")

# How models are trained from the settings; bump it when the same settings give other results
# (2: each model draws its batches from its own subset instead of masking shared batches; 3:
# fixed per-dataset normalisation constants instead of statistics of the training images;
# translation pads with black, raw pixel 0, instead of the mean colour), so that resume and
# merge refuse parts trained the old way.
TRAINING_SCHEME = 3


def array_hash(array) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def dataset_fingerprints(dataset) -> dict[str, str]:
    return {"train_images": array_hash(dataset.x_train), "train_labels": array_hash(
        dataset.y_train), "test_images": array_hash(dataset.x_test),
        "test_labels": array_hash(dataset.y_test)}


def settings_hash(settings: dict) -> str:
    ignored = EXECUTION_SETTINGS + REPORT_SETTINGS + ENSEMBLE_SETTINGS
    relevant = {k: v for k, v in sorted(settings.items()) if k not in ignored}
    relevant["training_scheme"] = TRAINING_SCHEME
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def result_fingerprints(masks: np.ndarray, settings: dict) -> dict[str, str]:
    """The mask matrix's and the result-changing settings' fingerprints."""
    return {"masks": array_hash(np.asarray(masks, bool)), "settings": settings_hash(settings)}


def check_same(expected: dict[str, str], actual: dict[str, str], action: str) -> None:
    """Raise UserError naming every fingerprint present in both that differs."""
    differ = [k for k in expected if k in actual and expected[k] != actual[k]]
    if differ:
        detail = "; ".join(f"{k} fingerprint differs (recorded {expected[k]}, now {actual[k]})"
                           for k in differ)
        raise UserError(f"{action}: {detail}")
