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

# Settings that change no result (only speed, placement or where things are).
EXECUTION_SETTINGS = ("data_dir", "eval_batch_size", "models_per_wave", "conv_impl", "ensemble",
                      "model_range", "until_se", "drop_diverged")

# How models are trained from the settings; bump it when the same settings give other results
# (2: each model draws its batches from its own subset instead of masking shared batches; 3:
# translation pads with black (raw pixel 0) instead of the mean colour), so that resume and
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
    relevant = {k: v for k, v in sorted(settings.items()) if k not in EXECUTION_SETTINGS}
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
