"""What a run directory holds, computed from a trained ensemble: the estimator's inputs (masks,
correctness at every evaluated epoch), the scores computed from them over the included models,
the run's record (config.json) and its summary numbers (metrics.json).

Training and merging both end here, so a merged run equals a single run over the same models.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxmem import estimator, margins, reliability, significance
from jaxmem.canaries import real_examples
from jaxmem.errors import UserError
from jaxmem.rundir.fingerprint import result_fingerprints
from jaxmem.rundir.heldout import HeldoutSums
from jaxmem.rundir.packed import PackedCorrectness
from jaxmem.rundir.store import diverged_models, save_run

# Where a run's time goes (metrics.json, `<part>_seconds`): the first step of each wave
# (compiling the step), the other training steps, evaluation (its compilation included),
# checkpoints.
TIMED_PARTS = ("compile", "train", "eval", "checkpoint")


@dataclasses.dataclass
class EnsembleResult:
    """Outputs of training K models. E = evaluated epochs.

    model_indices [K]; masks [K,N] bool; correct_train [E,K,N] and correct_test [E,K,N_test]
    correctness, held bit-packed (jaxmem/rundir/packed.py; bool arrays given are packed);
    train_loss, train_batch_acc [epochs, K] (means over each epoch's own
    examples); seconds spent per part (TIMED_PARTS); peak memory per wave in bytes (None
    where not reported); the memory plan's record (waves.MemoryPlan.record; None when merged);
    heldout: the included models' held-out prediction sums at the last evaluated epoch (None:
    not recorded); margins [K, N] int16: every model's true-class margins at the last evaluated
    epoch and margin_sums their included models' in- and held-out sums at every evaluated epoch
    (jaxmem/margins.py; None: not recorded).
    """

    model_indices: np.ndarray
    masks: np.ndarray
    epochs: list[int]
    correct_train: PackedCorrectness
    correct_test: PackedCorrectness
    train_loss: np.ndarray
    train_batch_acc: np.ndarray
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TIMED_PARTS, 0.0))
    devices: list[str] = dataclasses.field(default_factory=list)
    peak_memory_bytes: list[int | None] = dataclasses.field(default_factory=list)
    memory_plan: dict | None = None
    heldout: HeldoutSums | None = None  # held-out prediction sums of the included models
    margins: np.ndarray | None = None
    margin_sums: margins.MarginSums | None = None

    def __post_init__(self):
        for name in ("correct_train", "correct_test"):
            if not isinstance(getattr(self, name), PackedCorrectness):
                setattr(self, name, PackedCorrectness.pack(getattr(self, name)))

    @property
    def diverged(self) -> np.ndarray:
        """[K] bool: the models excluded from every number (store.diverged_models)."""
        return diverged_models(self.train_loss)


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a run directory records about its dataset (all a merge needs, no images): labels
    as trained on (canaries planted), the fingerprints of the dataset as loaded."""

    name: str
    num_classes: int
    image_shape: tuple[int, ...]
    labels: np.ndarray
    test_labels: np.ndarray
    original_index: np.ndarray
    fingerprints: dict[str, str]
    canary_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    canary_original_label: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))


def check_output_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"output directory {out!r} already exists; pass --overwrite to replace it")


def write_run(out: str, settings: dict, info: DataInfo, result: EnsembleResult, wall: float,
              provenance: dict, intervals: list = (), pilot: dict | None = None) -> None:
    """The run directory of `result`. settings: Config.to_dict(); provenance: how it was
    computed (resolved lowering, parameter count, versions, backend), recorded as given;
    wall: seconds the run took; intervals: when it (each of its parts) ran, [start, end] in
    seconds since the epoch (UTC), so that merges can tell parallel parts from sequential
    ones; pilot: the record of the pilot that chose the length (train/pilot.py), with its share
    of the wall time and its warning added to metrics.json."""
    record = {
        **settings,
        **provenance,
        "dataset_name": info.name,
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "num_train": len(info.labels),
        "num_test": len(info.test_labels),
        "models_trained": len(result.model_indices),
        "fingerprints": {**info.fingerprints, **result_fingerprints(result.masks, settings)},
        "devices": result.devices,
    }
    scores = score_arrays(result, info, settings["min_count"], settings["threshold"],
                          settings["fdr"])
    null = noise_floor(result, scores, settings)
    scores.update(null_samples_by_epoch=null.samples)  # [R, E] memorized counts
    metrics = summary_metrics(result, scores, settings, wall)
    metrics["noise_floor"] = null.as_dict()
    if intervals:
        metrics["run_intervals_utc"] = [[float(a), float(b)] for a, b in intervals]
    if pilot:
        metrics["pilot"] = {**pilot, "share_of_run": pilot["seconds"] / max(wall, 1e-9)}
        metrics["warnings"] += [pilot["warning"]] if pilot["warning"] else []
    arrays = {"masks": result.masks}
    if result.margins is not None:
        arrays["margins"] = result.margins
    save_run(out, record, metrics, arrays, scores,
             {"train": result.correct_train, "test": result.correct_test})


def score_arrays(result: EnsembleResult, info: DataInfo, min_count: int, threshold: float,
                 fdr: float) -> dict:
    """scores.npz contents: the estimator at every evaluated epoch over the included models,
    each example's p-value of H0: score <= threshold (`significance.margin_pvalues`) and the
    memorized set at false discovery rate `fdr` (`significance.memorized_at_fdr`: Benjamini-
    Hochberg over the real examples), plus per-model accuracies (of every model; a loaded Run
    filters them) and the held-out predictions (jaxmem/rundir/heldout.py) when the result has
    them."""
    keep = ~result.diverged
    masks = result.masks
    kept, correct = included(result)
    in_count, out_count = estimator.membership_counts(kept)
    in_correct, out_correct = correct.counts(kept)  # [E, N], from column blocks of the bits
    by_epoch = estimator.from_counts(in_correct, out_correct, in_count, out_count, min_count)
    pvalues = significance.margin_pvalues(in_correct, out_correct, in_count, out_count,
                                          threshold, min_count)
    fdr_set = significance.memorized_at_fdr(
        pvalues, real_examples(masks.shape[1], info.canary_index), fdr)
    if result.margin_sums is not None:
        margin = margins.memorization_margin(in_count, out_count, result.margin_sums)
        margin.update({f"{name}_by_epoch": values for name, values in margin.items()})
        margin.update(memorization_margin=margin["memorization_margin"][-1],
                      memorization_margin_se=margin["memorization_margin_se"][-1])
    else:
        margin = {}
    subset = masks.sum(-1)  # [K]: every model's own subset, right or wrong
    own_correct = result.correct_train.model_counts(masks)  # [E, K]
    heldout_correct = result.correct_train.model_counts() - own_correct
    own = own_correct / np.maximum(subset, 1)
    held = heldout_correct / np.maximum(masks.shape[1] - subset, 1)
    test_acc = result.correct_test.model_counts() / max(result.correct_test.count, 1)
    return {
        "memorization": by_epoch["memorization"][-1],
        "memorization_se": by_epoch["memorization_se"][-1],
        "memorization_by_epoch": by_epoch["memorization"],
        "memorization_se_by_epoch": by_epoch["memorization_se"],
        "threshold_pvalue": pvalues[-1],
        "threshold_pvalue_by_epoch": pvalues,
        "memorized_fdr": fdr_set[-1],
        "memorized_fdr_by_epoch": fdr_set,
        "epochs": np.asarray(result.epochs),
        "train_acc": own,
        "heldout_acc": held,
        "test_acc": test_acc,
        "train_loss": result.train_loss,
        "train_batch_acc": result.train_batch_acc,
        "labels": info.labels,
        "test_labels": info.test_labels,
        "in_count": in_count,
        "out_count": out_count,
        "low_count": by_epoch["low_count"],
        "original_index": info.original_index,
        "model_indices": result.model_indices,
        "diverged": ~keep,
        "canary_index": info.canary_index,
        "canary_original_label": info.canary_original_label,
        **(result.heldout.scores() if result.heldout is not None else {}),
        **({"margin_sums": result.margin_sums.sums} if result.margin_sums is not None else {}),
        **margin,
    }


def included(result: EnsembleResult) -> tuple[np.ndarray, PackedCorrectness]:
    """(masks [K', N], training correctness [E, K', N]) of the included models (the run's own
    arrays, no copy, when every model is included)."""
    keep = ~result.diverged
    if keep.all():
        return result.masks, result.correct_train
    return result.masks[keep], result.correct_train.select(models=keep)


def fit_warning(train_acc: float | None, fit_threshold: float, subset: int) -> str | None:
    """One plain sentence when the models do not fit their own training subsets (of `subset`
    examples each: every subset has the same size)."""
    if train_acc is None:
        return "Every model diverged: there are no scores."
    if train_acc >= fit_threshold:
        return None
    unfitted = (1 - train_acc) * subset
    return (f"The models fit only {train_acc:.3f} of their own training subsets: {unfitted:,.0f} "
            f"of {subset:,} examples unfitted on average (fit target {fit_threshold:g}), so "
            "memorization may not show: rare examples (changed labels, atypical ones) are a "
            "small share of a subset, and a held-out and an in-subset model both miss those "
            "left unfitted. Train longer (--epochs), with more steps per epoch (a smaller "
            "--batch-size) or a larger --arch.")


def noise_floor(result: EnsembleResult, scores: dict, settings: dict
                ) -> significance.NullCounts:
    """The permutation null of the memorized count at every evaluated epoch: what the same
    correctness gives with membership shuffled across the included models (real examples)."""
    keep = ~result.diverged
    real = real_examples(result.masks.shape[1], scores["canary_index"])
    if keep.sum() < 2:  # nothing to shuffle (and no scores): no samples, no floor
        return significance.null_counts(np.zeros((0, len(result.epochs)), np.int64),
                                        np.zeros(len(result.epochs), np.int64), settings["seed"])
    masks, correct = included(result)  # copied only when a model is excluded
    if not real.all():
        masks, correct = masks[:, real], correct.select(examples=real)
    return significance.permutation_null(
        masks, correct, settings["threshold"], settings["min_count"], settings["null_permutations"],
        settings["seed"])


def canary_recall(canary_scores: np.ndarray, threshold: float) -> list[float]:
    """[E, n] canary scores -> per epoch the share above threshold (NaN never counts); [] for
    a run without canaries."""
    if not canary_scores.shape[-1]:
        return []
    counts = estimator.memorized_count(canary_scores, threshold)
    return [float(c) / canary_scores.shape[-1] for c in counts]


# Below this canary recall the run says it cannot find memorization.
CANARY_RECALL_WARNING = 0.5


def canary_warning(recall: float | None, count: int, threshold: float) -> str | None:
    if recall is None or recall >= CANARY_RECALL_WARNING:
        return None
    return (f"The run finds only {round(recall * count)} of its {count} canaries (changed "
            f"labels scoring above {threshold:g}): it is not sensitive enough to detect "
            "memorization, so a low count of memorized examples says little. Use more "
            "models, or models that fit their training data.")


def summary_metrics(result: EnsembleResult, scores: dict, settings: dict, wall: float) -> dict:
    num_models, num_train = result.masks.shape
    examples_trained = int(result.masks.sum()) * settings["epochs"]
    examples_evaluated = num_models * (num_train + result.correct_test.shape[-1]) * len(
        result.epochs)
    keep = ~result.diverged
    real = real_examples(num_train, scores["canary_index"])  # every number below leaves
    scored = not scores["low_count"][real].all()  # the canaries out
    peaks = [p for p in result.peak_memory_bytes if p is not None]
    threshold = settings["threshold"]
    fit = [float(acc[keep].mean()) if keep.any() else None for acc in scores["train_acc"]]
    by_epoch = estimator.memorized_count(scores["memorization_by_epoch"][:, real], threshold)
    recall = canary_recall(scores["memorization_by_epoch"][:, ~real], threshold)
    warnings = [fit_warning(fit[-1], settings["fit_threshold"], int(result.masks[0].sum())),
                canary_warning(recall[-1] if recall else None, int((~real).sum()), threshold)]
    masks, correct = included(result)  # no copies when every model is included
    final = None if result.margins is None else (
        result.margins if keep.all() else result.margins[keep])
    split = reliability.split_half(masks, correct[-1], final, settings["seed"], real)
    return {
        "warnings": [w for w in warnings if w],
        "reliability": split,
        "train_acc_by_epoch": fit,
        "memorized_count": int(by_epoch[-1]),
        "memorized_count_by_epoch": [int(c) for c in by_epoch],
        "memorized_fdr_count": int(scores["memorized_fdr"][real].sum()),
        "memorized_fdr_count_by_epoch": [int(c) for c in
                                         scores["memorized_fdr_by_epoch"][:, real].sum(-1)],
        "fdr": settings["fdr"],
        "num_canaries": int((~real).sum()),
        "canary_recall_by_epoch": recall,
        "canary_recall": recall[-1] if recall else None,
        "threshold": threshold,
        "min_count": settings["min_count"],
        "low_count_examples": int(scores["low_count"][real].sum()),
        "mean_memorization": float(np.nanmean(scores["memorization"][real])) if scored else None,
        "max_memorization_se": (float(np.nanmax(scores["memorization_se"][real])) if scored
                                else None),
        "train_acc": float(scores["train_acc"][-1][keep].mean()) if keep.any() else None,
        "heldout_acc": float(scores["heldout_acc"][-1][keep].mean()) if keep.any() else None,
        "test_acc": float(scores["test_acc"][-1][keep].mean()) if keep.any() else None,
        "num_models": num_models,
        "num_included_models": int(keep.sum()),
        "diverged_models": [int(k) for k in result.model_indices[result.diverged]],
        "wall_time_s": wall,
        **{f"{part}_seconds": value for part, value in result.seconds.items()},
        "eval_share": result.seconds["eval"] / max(sum(result.seconds.values()), 1e-9),
        "train_model_examples_per_s": examples_trained / max(result.seconds["train"], 1e-9),
        "eval_model_examples_per_s": examples_evaluated / max(result.seconds["eval"], 1e-9),
        "seconds_per_model": wall / num_models,
        "models_per_hour": 3600.0 * num_models / max(wall, 1e-9),
        "peak_memory_bytes_per_wave": result.peak_memory_bytes,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "memory_plan": result.memory_plan,
        "devices": result.devices,
        "num_devices": len(result.devices),
    }
