"""Combine part run directories (job-array parts, or the parts of a multi-process run) into one
run directory identical to a single run over all the models.

Parts must agree: the same dataset and settings fingerprints, masks equal to the ones their seed
gives for their model indices, and model indices that neither overlap nor leave gaps.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

from jaxmem import margins
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.rundir.fingerprint import REPORT_SETTINGS, check_same
from jaxmem.rundir.heldout import combine
from jaxmem.rundir.packed import PackedCorrectness
from jaxmem.rundir.record import (
    TIMED_PARTS,
    DataInfo,
    EnsembleResult,
    check_output_dir,
    write_run,
)
from jaxmem.rundir.store import load_run

PART_WAIT_SECONDS = 24 * 3600
# config.json entries that say how a part was computed; a merge records the first part's
PROVENANCE = ("resolved", "num_params", "versions", "backend", "setting_sources")


def config_of(record: dict) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in record.items() if k in fields})


def merge_runs(part_dirs: list[str], out: str, overwrite: bool = False,
               model_range: str | None = None, report: dict | None = None,
               pilot: dict | None = None) -> str:
    """Merge part directories into `out` (which may be one of the parts: it is replaced
    atomically). model_range: the range the parts must cover together (default: all of the
    largest --num-models among the parts; with --until-se, up to the last model trained).
    report: settings that change only what the run reports (REPORT_SETTINGS: --fdr,
    --null-permutations, --fit-threshold) to use and record instead of the parts' (which must
    then agree on those not given). pilot: the record of the pilot that chose the run's length
    (its time not in any part, `unused_seconds`, counts towards the wall time)."""
    if not part_dirs:
        raise UserError("no part directories given")
    check_output_dir(out, overwrite)
    parts = sorted((load_run(p, all_models=True) for p in part_dirs),
                   key=lambda r: int(r.model_indices[0]))
    first = parts[0]
    shared = {k: v for k, v in first.config["fingerprints"].items() if k != "masks"}
    for part in parts[1:]:
        check_same(shared, part.config["fingerprints"],
                   f"refusing to merge {part.path} with {first.path}")
    # Parts may differ in --num-models and --until-se (a grown run): the merged run holds the
    # largest K, and its stopping rule is the one the last models were trained under (the
    # part holding them); a target of earlier parts did not decide where the run ends.
    config = dataclasses.replace(config_of(first.config), model_range=model_range,
                                 num_models=max(int(p.config["num_models"]) for p in parts),
                                 until_se=parts[-1].config.get("until_se"),
                                 **report_settings(parts, report or {}))
    indices = np.concatenate([p.model_indices for p in parts])
    check_coverage(indices, config)
    check_masks(parts, config)
    result = EnsembleResult(
        model_indices=indices,
        masks=np.concatenate([np.asarray(p.masks) for p in parts]),
        epochs=[int(e) for e in first.epochs],
        correct_train=PackedCorrectness.concatenate([p.correct_epochs("train") for p in parts]),
        correct_test=PackedCorrectness.concatenate([p.correct_epochs("test") for p in parts]),
        train_loss=np.concatenate([p.train_loss for p in parts], axis=1),
        train_batch_acc=np.concatenate([p.train_batch_acc for p in parts], axis=1),
        seconds={part: sum(p.metrics.get(f"{part}_seconds", 0.0) for p in parts)
                 for part in TIMED_PARTS},
        devices=sorted({d for p in parts for d in p.metrics["devices"]}),
        peak_memory_bytes=[b for p in parts for b in p.metrics["peak_memory_bytes_per_wave"]],
        heldout=combine([p.extra for p in parts]),
        margins=(np.concatenate([np.asarray(p.margin_units) for p in parts])
                 if all(p.has_margins for p in parts) else None),
        margin_sums=margins.combine([p.extra for p in parts]))
    info = DataInfo(first.config["dataset_name"], first.config["num_classes"],
                    tuple(first.config["image_shape"]), first.labels, first.test_labels,
                    first.original_index, {k: v for k, v in first.config["fingerprints"].items()
                                           if k not in ("masks", "settings")},
                    first.canary_index, first.canary_original_label)
    provenance = {k: first.config[k] for k in PROVENANCE if k in first.config}
    intervals = [i for p in parts for i in p.metrics.get("run_intervals_utc", [])]
    untimed = sum(p.metrics["wall_time_s"] for p in parts if "run_intervals_utc" not in p.metrics)
    unused = pilot["unused_seconds"] if pilot else 0.0
    write_run(out, config.to_dict(), info, result, busy_seconds(intervals) + untimed + unused,
              provenance, intervals, pilot)
    return out


def report_settings(parts: list, given: dict) -> dict:
    """The REPORT_SETTINGS of the merged run: those given now, else the parts' own, which must
    agree (a merge never picks one part's silently)."""
    chosen = {}
    for name in REPORT_SETTINGS:
        if name in given:
            chosen[name] = given[name]
            continue
        values = sorted({p.config[name] for p in parts if name in p.config})
        if len(values) > 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"refusing to merge: the parts differ in {flag} "
                            f"({', '.join(map(str, values))}); give the one the merged run "
                            f"reports with {flag}")
        if values:
            chosen[name] = values[0]
    return chosen


def busy_seconds(intervals: list) -> float:
    """Seconds during which at least one part ran: the length of the union of [start, end]
    intervals. Parts that ran side by side (processes of one job, a job array) count their
    span once, not their sum; parts that ran one after another (a run, then the models a
    --grow added) count their own times, not the time between them."""
    total, end = 0.0, -np.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def check_coverage(indices: np.ndarray, config: Config) -> None:
    """The parts' model indices neither overlap nor leave gaps in the models the merged run
    holds: config.model_indices(), or with --until-se those up to the last one trained."""
    expected = np.asarray(config.model_indices())
    if config.until_se is not None:
        expected = expected[expected <= indices.max()]
    values, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"refusing to merge: parts overlap (models "
                        f"{_ranges(values[counts > 1].tolist())})")
    if not np.array_equal(np.sort(indices), expected):
        missing = sorted(set(expected) - set(indices))
        raise UserError(f"refusing to merge: parts leave gaps (missing models "
                        f"{_ranges(missing)}) or go beyond {expected[0]}:{expected[-1] + 1}")


def check_masks(parts: list, config: Config) -> None:
    """Every part's masks are the ones its seed and model indices give."""
    from jaxmem.masks import subset_masks  # imports jax: only when merging

    for part in parts:
        want = subset_masks(config.seed, part.model_indices, len(part.labels),
                            config.subset_ratio)
        if not np.array_equal(np.asarray(part.masks), want):
            raise UserError(f"refusing to merge: the masks of {part.path} are not the ones its "
                            "seed and model indices give")


def wait_for_parts(part_dirs: list[str], timeout: float = PART_WAIT_SECONDS,
                   stopped: Callable[[], bool] = lambda: False) -> bool:
    """Block until every part directory is complete (its metrics.json exists): True; or
    until `stopped()` (asked every second) says to stop waiting: False."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(p, "metrics.json")) for p in part_dirs):
        if stopped():
            return False
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for parts {part_dirs}")
        time.sleep(1.0)
    return True


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
