"""Writing and reading a run directory (the format is documented in README.md, "The run
directory").

A loaded `Run` presents the run's *included* models only: a model excluded from the run (its
loss diverged and `--drop-diverged` dropped it) is left out of every per-model array it gives
(masks, correctness, accuracies, losses), so no analysis can count it by mistake. The stored
per-example scores were computed over the included models already.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from jaxmem import atomic
from jaxmem.canaries import real_examples
from jaxmem.errors import UserError
from jaxmem.estimator import (
    DEFAULT_MIN_COUNT,
    DEFAULT_THRESHOLD,
    membership_counts,
    memorization_scores,
)
from jaxmem.margins import MarginSums, memorization_margin
from jaxmem.margins import logits as margin_logits
from jaxmem.rundir import manifest
from jaxmem.rundir.packed import PackedCorrectness
from jaxmem.significance import margin_pvalues, memorized_at_fdr

REQUIRED_FILES = ("config.json", "masks.npy", "scores.npz", "metrics.json")
# scores.npz arrays with one column per model (model axis last): filtered to included models.
PER_MODEL_SCORES = ("train_acc", "heldout_acc", "test_acc", "train_loss", "train_batch_acc")


def diverged_models(train_loss: np.ndarray) -> np.ndarray:
    """The run's one exclusion rule: [epochs, K] per-epoch losses -> [K] bool, True for a model
    whose loss was NaN/inf in any epoch. Such a model is excluded from every number."""
    return ~np.isfinite(np.asarray(train_loss, np.float64)).all(axis=0)


class PackedEpochs(PackedCorrectness):
    """A run's correctness [E, K, N] as a lazy sequence of [K, N] bool arrays: the bit-packed
    file is read once and one epoch is unpacked at a time (CIFAR: 2,000 models x 50,000
    examples is 100 MB per epoch unpacked, 12.5 MB packed). `models`: rows to keep, `examples`:
    columns to keep (None: all)."""

    def __init__(self, path: str, split: str = "train", models: np.ndarray | None = None,
                 examples: np.ndarray | None = None):
        file = os.path.join(path, "correct_by_epoch.npz")
        if not os.path.exists(file):
            raise UserError(f"{path} has no correct_by_epoch.npz")
        with np.load(file) as packed:
            bits, count = packed[split], int(packed[f"num_{split}"])
        super().__init__(bits, count, models, examples)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory, loaded; its per-model arrays hold the included models only (K of
    them), its per-example arrays N entries, E = evaluated epochs.

    Per example: memorization [N] (last evaluated epoch), memorization_se [N],
    memorization_by_epoch, memorization_se_by_epoch [E, N], threshold_pvalue_by_epoch [E, N]
    (p-value of H0: score <= the run's threshold; NaN in runs written before it), the
    model-based estimate of the same score from the models' margins (jaxmem/margins.py):
    memorization_margin, memorization_margin_se [N] and memorization_margin_by_epoch,
    memorization_margin_se_by_epoch [E, N] (NaN in runs written before margins), labels [N],
    in_count, out_count, low_count [N], original_index [N]; test_labels [N_test]; epochs [E]
    (1-based).
    Per model: train_acc (own subset), heldout_acc, test_acc [E, K]; train_loss,
    train_batch_acc [epochs, K]; model_indices [K]. Excluded models: excluded_models (their
    indices in the run). Canaries (planted label changes): canary_index [n] and their
    canary_original_label [n]; `real` [N] marks the other examples, the only ones counted.
    Held-out predictions (last evaluated epoch, included models that held the example out;
    jaxmem/rundir/heldout.py): heldout_probs [N, C] mean softmax probabilities (NaN where no
    model held the example out), suggested_label [N] their majority class (-1 there) and
    suggested_label_share [N] its share of their votes; the sums behind them are in `extra`.
    Runs written before these were recorded give NaN and -1.
    Arrays the run stores beyond these are in `extra`.
    """

    path: str
    config: dict
    metrics: dict
    memorization: np.ndarray
    memorization_se: np.ndarray
    memorization_by_epoch: np.ndarray
    memorization_se_by_epoch: np.ndarray
    threshold_pvalue_by_epoch: np.ndarray
    memorization_margin: np.ndarray
    memorization_margin_se: np.ndarray
    memorization_margin_by_epoch: np.ndarray
    memorization_margin_se_by_epoch: np.ndarray
    epochs: np.ndarray
    labels: np.ndarray
    test_labels: np.ndarray
    in_count: np.ndarray
    out_count: np.ndarray
    low_count: np.ndarray
    original_index: np.ndarray
    train_acc: np.ndarray
    heldout_acc: np.ndarray
    test_acc: np.ndarray
    train_loss: np.ndarray
    train_batch_acc: np.ndarray
    model_indices: np.ndarray
    canary_index: np.ndarray
    canary_original_label: np.ndarray
    heldout_probs: np.ndarray
    suggested_label: np.ndarray
    suggested_label_share: np.ndarray
    excluded_models: np.ndarray
    extra: dict[str, np.ndarray]
    _rows: np.ndarray | None  # rows of the stored per-model arrays that are included (None: all)

    @property
    def masks(self) -> np.ndarray:
        """[K, N] bool: masks[k, i] is True when example i is in model k's subset."""
        return self._array("masks.npy")

    @property
    def correct_train(self) -> np.ndarray:
        """[K, N] bool correctness at the last evaluated epoch."""
        return self._array("correct_train.npy")

    @property
    def correct_test(self) -> np.ndarray:
        """[K, N_test] bool correctness at the last evaluated epoch."""
        return self._array("correct_test.npy")

    @property
    def has_margins(self) -> bool:
        """Whether the run kept its models' margins (runs written before did not)."""
        return os.path.exists(os.path.join(self.path, "margins.npy"))

    @property
    def margin_units(self) -> np.ndarray:
        """[K, N] int16 true-class margins at the last evaluated epoch in jaxmem/margins.py's
        fixed point (`> 0` exactly where correct_train is True)."""
        if not self.has_margins:
            raise UserError(f"{self.path} was written before jaxmem kept margins: it has none")
        return self._array("margins.npy")

    @property
    def margins(self) -> np.ndarray:
        """[K, N] float32 true-class margins at the last evaluated epoch: each model's
        true-class logit minus its largest other logit, to 1/128 (positive exactly where the
        model is correct)."""
        return margin_logits(self.margin_units)

    def _array(self, name: str) -> np.ndarray:
        array = np.load(os.path.join(self.path, name), mmap_mode="r")
        return array if self._rows is None else np.asarray(array[self._rows])

    def correct_epochs(self, split: str = "train", real_only: bool = False) -> PackedEpochs:
        """Correctness at every evaluated epoch as a lazy sequence of [K, N] (or [K, N_test]);
        real_only: training examples without the canaries (the columns every count uses)."""
        examples = self.real if real_only and split == "train" and len(self.canary_index) else None
        return PackedEpochs(self.path, split, self._rows, examples)

    def correct_by_epoch(self, split: str = "train") -> np.ndarray:
        """[E, K, N] bool correctness at every evaluated epoch (split 'train' or 'test')."""
        epochs = self.correct_epochs(split)
        return np.stack([epochs[e] for e in range(len(epochs))])

    def memorized(self, threshold: float = DEFAULT_THRESHOLD, epoch: int | None = None,
                  fdr: float | None = None) -> np.ndarray:
        """Indices of the real examples (no canaries) whose score is above threshold (last
        evaluated epoch by default). fdr: instead, the examples whose score exceeds threshold at
        this false discovery rate: the Benjamini-Hochberg procedure over the real examples'
        p-values of H0: score <= threshold (`threshold_pvalues`), a set in which at most a share
        `fdr` are expected to have a true score at or below the threshold."""
        if fdr is None:
            scores = self.counted_scores(epoch)
            return np.flatnonzero(np.nan_to_num(scores, nan=-np.inf) > threshold)
        return np.flatnonzero(memorized_at_fdr(self.threshold_pvalues(threshold, epoch),
                                               self.real, fdr))

    def threshold_pvalues(self, threshold: float = DEFAULT_THRESHOLD,
                          epoch: int | None = None) -> np.ndarray:
        """[N] p-values of H0: score <= threshold at an evaluated epoch (None = the last): the
        stored ones for the run's own threshold, else computed from masks and correctness."""
        position = self.epoch_position(epoch)
        stored = self.threshold_pvalue_by_epoch[position]
        if threshold == self.config.get("threshold", DEFAULT_THRESHOLD) and \
                not np.isnan(stored).all():
            return stored
        masks = np.asarray(self.masks)
        in_count, out_count = membership_counts(masks)
        in_correct, out_correct = self.correct_epochs().counts(masks, position)
        return margin_pvalues(in_correct, out_correct, in_count, out_count, threshold,
                              int(self.config.get("min_count", DEFAULT_MIN_COUNT)))

    def scores(self, models=None) -> dict[str, np.ndarray]:
        """Both estimates of every example's score at the last evaluated epoch, recomputed from
        the chosen included models (their indices in the run, as in `model_indices`; None:
        all): memorization, memorization_se, low_count (`--min-count`), memorization_margin,
        memorization_margin_se (NaN without margins), in_count, out_count [N]. The scores a
        run of exactly these models would report (a convergence plot: scores of the first
        k models for growing k)."""
        rows = np.arange(len(self.model_indices))
        if models is not None:
            models = np.asarray(models).reshape(-1)
            position = {int(k): row for row, k in enumerate(self.model_indices)}
            unknown = [int(k) for k in models if int(k) not in position]
            if unknown or len(set(models.tolist())) != len(models):
                raise UserError(f"models must be distinct included models of {self.path} "
                                f"(see model_indices); not included: {unknown[:5]}")
            rows = np.asarray([position[int(k)] for k in models], np.int64)
        masks = np.asarray(self.masks)[rows]
        plain = memorization_scores(masks, np.asarray(self.correct_train)[rows],
                                    int(self.config.get("min_count", DEFAULT_MIN_COUNT)))
        in_count, out_count = membership_counts(masks)
        if self.has_margins:
            units = np.asarray(self.margin_units)[rows]
            sums = MarginSums.of(units[None], masks, np.ones(len(rows), bool))
            margin = {k: v[0] for k, v in memorization_margin(in_count, out_count, sums).items()}
        else:
            nothing = np.full(masks.shape[1], np.nan)
            margin = {"memorization_margin": nothing, "memorization_margin_se": nothing}
        return {**plain, **margin, "in_count": in_count, "out_count": out_count}

    def ranking(self, epoch: int | None = None) -> np.ndarray:
        """The real examples (no canaries), most memorized first: by score, ties broken by
        the margin estimate (`memorization_margin`), then by index; NaN scores last. The 0/1
        estimator ties often with few models (a K = 32 run scores 136 of 2,000 examples
        exactly 1.00), and the margins carry the order among them."""
        position = self.epoch_position(epoch)
        order = rank_order(self.scores_at(epoch), self.memorization_margin_by_epoch[position])
        return order[self.real[order]]

    def most_memorized(self, count: int = 10, epoch: int | None = None) -> np.ndarray:
        """Indices of the `count` most memorized real examples (no canaries), first first:
        the top of `ranking`."""
        return self.ranking(epoch)[:count]

    def to_frame(self):
        """The run's table (`jaxmem.export`: one row per training example) as a pandas
        DataFrame. pandas is not a dependency of jaxmem; `python -m jaxmem.export RUN` writes
        the same table as CSV without it."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError("Run.to_frame needs pandas, which jaxmem does not install: pip "
                            "install pandas (or write a CSV: python -m jaxmem.export RUN)"
                            ) from None
        from jaxmem.rundir.table import table_columns

        return pd.DataFrame(table_columns(self))

    def epoch_position(self, epoch: int | None) -> int:
        """Position of an evaluated epoch (1-based, as in `epochs`) in the [E, ...] arrays;
        None = the last one."""
        epochs = [int(e) for e in self.epochs]
        if epoch is None:
            return len(epochs) - 1
        if epoch not in epochs:
            raise UserError(f"epoch {epoch} was not evaluated; evaluated epochs: {epochs}")
        return epochs.index(epoch)

    def scores_at(self, epoch: int | None = None) -> np.ndarray:
        """Scores [N] at an evaluated epoch (1-based, as in `epochs`); None = the last one."""
        return self.memorization_by_epoch[self.epoch_position(epoch)]

    @property
    def real(self) -> np.ndarray:
        """[N] bool: the dataset's own examples (False for canaries)."""
        return real_examples(len(self.labels), self.canary_index)

    def counted_scores(self, epoch: int | None = None) -> np.ndarray:
        """Scores [N] with canaries set to NaN: what every count of memorized examples uses
        (NaN never counts)."""
        return np.where(self.real, self.scores_at(epoch), np.nan)


def rank_order(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices [N] by descending score, equal scores by descending tiebreak, then by index;
    NaN after every number in each key."""
    keys = [np.nan_to_num(-np.asarray(a, np.float64), nan=np.inf) for a in (tiebreak, scores)]
    return np.lexsort(keys)


def load_run(path: str, dataset=None, all_models: bool = False) -> Run:
    """Load a run directory written by `experiments/run.py`, after checking that every array
    file is the one written (its size and SHA-256, as config.json records them; a DamagedRun
    error names the first that differs: jaxmem/rundir/manifest.py).

    dataset: a `jaxmem.data.Dataset` to check against the run's fingerprints (refused with a
    UserError naming what differs, e.g. a changed label or a reordered training set).
    all_models: keep excluded (diverged) models in the per-model arrays; only for combining
    run directories (merge), never for analysis.
    """
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
    if "config.json" in missing:
        raise UserError(f"{path} is not a complete run directory (missing {', '.join(missing)})")
    config = read_record(path, "config.json")
    manifest.check(path, config.get(manifest.RECORD))  # names a missing array file first
    if missing:
        raise manifest.DamagedRun(f"{path} is not a complete run directory (missing "
                                  f"{', '.join(missing)}); {manifest.RECOPY}")
    metrics = read_record(path, "metrics.json")
    with np.load(os.path.join(path, "scores.npz")) as archive:
        scores = {key: archive[key] for key in archive.files}
    if dataset is not None:
        from jaxmem.rundir.fingerprint import check_same, dataset_fingerprints

        check_same(config.get("fingerprints", {}), dataset_fingerprints(dataset),
                   f"dataset {dataset.name!r} does not match run {path}")
    for name in ("canary_index", "canary_original_label"):  # runs written without canaries
        scores.setdefault(name, np.zeros(0, np.int64))
    for name in ("memorization_margin", "memorization_margin_se"):  # written without margins
        scores.setdefault(name, np.full(scores["memorization"].shape, np.nan))
        scores.setdefault(f"{name}_by_epoch", np.full(scores["memorization_by_epoch"].shape,
                                                      np.nan))
    scores.setdefault("threshold_pvalue_by_epoch",  # runs written without the test
                      np.full(scores["memorization_by_epoch"].shape, np.nan))
    num_train = len(scores["labels"])  # runs written without held-out predictions
    scores.setdefault("heldout_probs", np.full((num_train, config["num_classes"]), np.nan))
    scores.setdefault("suggested_label", np.full(num_train, -1, np.int64))
    scores.setdefault("suggested_label_share", np.full(num_train, np.nan))
    all_indices = scores["model_indices"]
    excluded = scores.get("diverged", np.zeros(len(all_indices), bool)).astype(bool)
    rows = None if all_models or not excluded.any() else np.flatnonzero(~excluded)
    if rows is not None:
        for name in PER_MODEL_SCORES:
            scores[name] = scores[name][..., rows]
        scores["model_indices"] = all_indices[rows]
    excluded_models = all_indices[:0] if all_models else all_indices[excluded]
    fields = {f.name for f in dataclasses.fields(Run)} - {"path", "config", "metrics", "extra",
                                                         "excluded_models", "_rows"}
    extra = {k: v for k, v in scores.items() if k not in fields}
    return Run(os.path.abspath(path), config, metrics, **{k: scores[k] for k in fields},
               excluded_models=excluded_models, extra=extra, _rows=rows)


def read_record(path: str, name: str) -> dict:
    """A JSON record of the run directory `path` (config.json, metrics.json)."""
    file = os.path.join(path, name)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise manifest.DamagedRun(f"{file}: unreadable ({error}): {manifest.RECOPY}") from None


def save_run(path: str, config: dict, metrics: dict, arrays: dict[str, np.ndarray],
             scores: dict[str, np.ndarray], correct_by_epoch: dict[str, PackedCorrectness]
             ) -> None:
    """Write a run directory atomically and durably: everything goes to a sibling temporary
    folder, whose files are flushed to the disk, and which is renamed into place at the end
    (jaxmem/atomic.py), so an interrupted write, or a crash of the machine, never leaves a half
    run behind, and a run already at `path` stays until the new one is complete. config.json
    records every array file written with its size and SHA-256 (jaxmem/rundir/manifest.py).
    A full disk raises DiskFull naming `path` and about the bytes the directory needs; the
    temporary folder is removed.

    arrays: name -> array saved as name.npy (masks, margins); correct_by_epoch: split ->
    [E, K, N] packed correctness, saved as it is in correct_by_epoch.npz, its last epoch
    unpacked block by block into correct_{split}.npy.
    """
    parent = os.path.dirname(os.path.abspath(path))
    packed = {}
    for split, correct in correct_by_epoch.items():
        packed[split] = correct.packed()
        packed[f"num_{split}"] = np.int64(correct.count)
    records = {"metrics.json": atomic.json_text(metrics), "config.json": atomic.json_text(config)}
    last_epochs = sum(c.shape[1] * c.shape[2] for c in correct_by_epoch.values())
    needed = (atomic.npz_bytes(arrays) + atomic.npz_bytes(scores) + atomic.npz_bytes(packed)
              + last_epochs + sum(len(text) for text in records.values()))
    with atomic.room_for(path, needed):
        atomic.make_folder(parent)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        try:
            os.chmod(staging, atomic.umask_mode(0o777))  # mkdtemp's 0700 shuts out the group
            for name, value in arrays.items():
                atomic.save_npy(os.path.join(staging, f"{name}.npy"), value)
            for split, correct in correct_by_epoch.items():
                save_rows(os.path.join(staging, f"correct_{split}.npy"), correct, -1)
            np.savez(os.path.join(staging, "scores.npz"), **scores)
            np.savez_compressed(os.path.join(staging, "correct_by_epoch.npz"), **packed)
            records["config.json"] = atomic.json_text(
                {**config, manifest.RECORD: manifest.describe(staging)})
            for name, text in records.items():
                with open(os.path.join(staging, name), "w") as f:
                    f.write(text)
            atomic.replace_folder(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def save_rows(path: str, correct: PackedCorrectness, epoch: int) -> None:
    """One epoch of packed correctness as a [K, N] bool .npy file, written block by block."""
    _, models, examples = correct.shape
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
            np.dtype(bool)), "fortran_order": False, "shape": (models, examples)})
        for rows in correct.unpacked_rows(epoch):
            f.write(rows.tobytes())
