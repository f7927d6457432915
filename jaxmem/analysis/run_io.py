"""Reading a run directory (the format is documented in README.md, "The run directory")."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from jaxmem.analysis.scores import DEFAULT_THRESHOLD
from jaxmem.errors import UserError

REQUIRED_FILES = ("config.json", "masks.npy", "scores.npz", "metrics.json")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory, loaded. Arrays: masks [K,N] bool, memorization [N], ..."""

    path: str
    config: dict
    metrics: dict
    scores: dict[str, np.ndarray]

    @property
    def masks(self) -> np.ndarray:
        return self._array("masks.npy")

    @property
    def correct_train(self) -> np.ndarray:
        return self._array("correct_train.npy")

    @property
    def correct_test(self) -> np.ndarray:
        return self._array("correct_test.npy")

    def _array(self, name: str) -> np.ndarray:
        return np.load(os.path.join(self.path, name), mmap_mode="r")

    def correct_by_epoch(self, split: str = "train") -> np.ndarray:
        """[E, K, N] bool correctness at every evaluated epoch (split 'train' or 'test')."""
        with np.load(os.path.join(self.path, "correct_by_epoch.npz")) as packed:
            bits, count = packed[split], int(packed[f"num_{split}"])
        return np.unpackbits(bits, axis=-1, count=count).astype(bool)

    def __getattr__(self, name: str):
        scores = self.__dict__.get("scores", {})
        if name in scores:
            return scores[name]
        raise AttributeError(name)

    def memorized(self, threshold: float = DEFAULT_THRESHOLD, epoch: int | None = None):
        """Indices of examples whose score is above threshold (last evaluated epoch by default)."""
        scores = self.scores_at(epoch)
        return np.flatnonzero(np.nan_to_num(scores, nan=-np.inf) > threshold)

    def most_memorized(self, count: int = 10, epoch: int | None = None) -> np.ndarray:
        """Indices of the `count` highest scores, highest first (NaN scores last)."""
        scores = np.nan_to_num(self.scores_at(epoch), nan=-np.inf)
        return np.argsort(-scores, kind="stable")[:count]

    def scores_at(self, epoch: int | None = None) -> np.ndarray:
        """Scores [N] at an evaluated epoch (1-based, as in `epochs`); None = the last one."""
        if epoch is None:
            return self.scores["memorization"]
        epochs = list(self.scores["epochs"])
        if epoch not in epochs:
            raise UserError(f"epoch {epoch} was not evaluated; evaluated epochs: {epochs}")
        return self.scores["memorization_by_epoch"][epochs.index(epoch)]


def load_run(path: str, dataset=None) -> Run:
    """Load a run directory written by `experiments/run.py`.

    dataset: a `jaxmem.data.Dataset` to check against the run's fingerprints (refused with a
    UserError naming what differs, e.g. a changed label or a reordered training set).
    """
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise UserError(f"{path} is not a complete run directory (missing {', '.join(missing)})")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "metrics.json")) as f:
        metrics = json.load(f)
    with np.load(os.path.join(path, "scores.npz")) as archive:
        scores = {key: archive[key] for key in archive.files}
    if dataset is not None:
        from jaxmem.fingerprint import check_same, dataset_fingerprints

        check_same(config.get("fingerprints", {}), dataset_fingerprints(dataset),
                   f"dataset {dataset.name!r} does not match run {path}")
    return Run(os.path.abspath(path), config, metrics, scores)


def save_run(path: str, config: dict, metrics: dict, arrays: dict[str, np.ndarray],
             scores: dict[str, np.ndarray], correct_by_epoch: dict[str, np.ndarray]) -> None:
    """Write a run directory atomically: everything goes to a sibling temporary folder that is
    renamed into place at the end, so an interrupted write never leaves a half run behind.

    arrays: name -> array saved as name.npy (masks, correct_train, correct_test);
    correct_by_epoch: split -> [E, K, N] bool, saved bit-packed in correct_by_epoch.npz.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        for name, value in arrays.items():
            np.save(os.path.join(staging, f"{name}.npy"), value)
        np.savez(os.path.join(staging, "scores.npz"), **scores)
        packed = {}
        for split, correct in correct_by_epoch.items():
            packed[split] = np.packbits(correct, axis=-1)
            packed[f"num_{split}"] = np.int64(correct.shape[-1])
        np.savez_compressed(os.path.join(staging, "correct_by_epoch.npz"), **packed)
        for name, record in (("config.json", config), ("metrics.json", metrics)):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(record, f, indent=2, sort_keys=True)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
