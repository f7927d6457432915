"""The pilot: where no published recipe applies, the run finds the training length that fits
its data instead of guessing it.

The small-data recipe (jaxmem/recipes.py) chooses a batch, a learning rate and a length that
fit the sets it was measured on; on other data its length may leave the models short of
interpolating, and then memorization cannot show. So before the ensemble, the pilot trains the
run's first P models (models 0..P-1, a part `--model-range 0:P` of the run itself) with the
recipe's length, and doubles the length (up to CAP_EPOCHS) until their mean accuracy on their
own subsets reaches `--fit-threshold`. The run then trains models P..K-1 at that length and
merges them with the pilot's part at that length: model k depends on (seed, k) and the settings
only, so those ARE the run's models 0..P-1 and the result equals a run given `--epochs` of the
chosen length (no pilot), bit for bit.

Each length is trained in full: the triangular schedule depends on the length (its peak comes
at 25% of training and it decays to zero at the end), so a model after 18 epochs of a 36-epoch
schedule is not the 18-epoch model, and nothing shorter tells whether the longer schedule fits.
With doubling, the pilot costs P models at every tried length; the last one is reused.

P: on a CPU max(2, devices) (at most K): two models give a mean over two subsets, one model
keeps the cores busy, so a wave's time grows with its models (a wave of 30 was up to a third
slower per model than a wave of 2: BENCHMARKS.md), and on several devices one model per device
costs no more time than one. At K = 32, P = 2 and 18 -> 36 -> 72 epochs the pilot trains
2 x (18 + 36 + 72) = 252 model-epochs besides the other 30 x 72 = 2,160 (about 10% of the
run's time). On a GPU or TPU a wave of 2 models leaves the device mostly idle and takes about
as long as a full one, so there P is one wave as the run's memory plan sizes it
(`--models-per-wave`, else train/waves.py): the pilot's last length is then the run's first
wave at no extra cost. The share the plan line states is projected from the chosen length's
measured times: its work per wave (training, evaluation, checkpoints) repeated for the rest's
waves on a GPU or TPU, or for its models on a CPU, plus what the length spent once (loading,
compiling, writing).

The work lives in `<out>.pilot/`: one finished part run directory per tried length
(`epochs-018`, ...) with the checkpoints of the length in progress (`epochs-036.partial`), and
the rest of the run, models P..K-1, as a part of its own (`rest`, checkpoints in
`rest.partial`), so that a run killed at any point resumes with `--resume`: neither a finished
length nor the finished epochs of the one in progress are trained again, a finished rest is
merged, and a run killed once its directory was written only removes `<out>.pilot/`, which the
merge leaves until `--out` is complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from typing import NamedTuple

import jax
from tqdm.auto import tqdm

from jaxmem import canaries, data, recipes
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.models import ARCHS
from jaxmem.rundir import check_output_dir, load_run, merge_runs
from jaxmem.rundir.fingerprint import check_same, settings_hash
from jaxmem.train import loop, waves

CAP_EPOCHS = 400  # the longest schedule tried (the paper's models: 100 epochs)
MIN_PILOT_MODELS = 2


def wanted(config: Config, sources: dict[str, str]) -> bool:
    """Does this run start with a pilot? When the epochs are the small-data recipe's guess
    (neither given nor the paper's) and `--no-pilot` was not given."""
    return config.pilot and sources.get("epochs") == "recipe"


class PilotModels(NamedTuple):
    """The models the pilot trains at every length: how many, how the plan line says it, and
    whether the rest of the run repeats the time of a wave (GPU, TPU) or of a model (CPU)."""

    count: int
    said: str
    by_wave: bool


def accelerator() -> str | None:
    """The backend's name on a GPU or TPU; None on a CPU."""
    backend = jax.default_backend()
    return None if backend == "cpu" else backend


def pilot_models(config: Config, base: str) -> PilotModels:
    """P (see the module docstring); on resume, as many as the lengths begun in `base` hold
    (the device count or the free memory may differ now)."""
    device = accelerator()
    fewest = min(config.num_models, max(MIN_PILOT_MODELS, jax.device_count()))
    begun = begun_models(base)
    if begun is not None:
        return PilotModels(begun, f"{begun} models, as the lengths it began", device is not None)
    if device is None:
        return PilotModels(fewest, f"{fewest} models: a CPU trains a model in about the same "
                           "time in any wave", False)
    wave = min(config.num_models, max(fewest, config.models_per_wave or planned_wave(config)))
    return PilotModels(wave, f"one planned wave of {wave} models: a wave of 2 would leave the "
                       f"{device} mostly idle", True)


def begun_models(base: str) -> int | None:
    """The models of the pilot's lengths in `base`, finished (config.json) or in progress
    (the work directory's record.json); None where none was begun."""
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if not name.startswith("epochs-"):
            continue
        for record, key in (("config.json", None), ("record.json", "settings")):
            path = os.path.join(base, name, record)
            if os.path.exists(path):
                with open(path) as f:
                    settings = json.load(f)
                return int((settings[key] if key else settings)["model_range"].split(":")[1])
    return None


def planned_wave(config: Config) -> int:
    """The models of the run's first wave as its memory plan sizes it (train/waves.py: the
    compiled step of these settings against the device's free memory)."""
    dataset, _ = canaries.plant(data.load_for(config), config.canaries, config.seed)
    return waves.plan_memory(loop.Trainer(config, dataset), config.num_models).wave_size


def lengths(first: int) -> list[int]:
    """The lengths tried, in order: first, doubled until CAP_EPOCHS, which is tried last."""
    tried = [first]
    while tried[-1] < CAP_EPOCHS:
        tried.append(min(2 * tried[-1], CAP_EPOCHS))
    return tried


def at_length(config: Config, sources: dict[str, str], epochs: int) -> Config:
    """config trained for `epochs`, evaluated about recipes.EVALUATIONS times unless
    --eval-every was given."""
    eval_every = (config.eval_every if sources.get("eval_every") == "flag"
                  else recipes.evaluation_interval(epochs))
    return dataclasses.replace(config, epochs=epochs, eval_every=eval_every)


def chosen_sources(sources: dict[str, str]) -> dict[str, str]:
    """setting_sources of a run whose length the pilot chose."""
    return {**sources, "epochs": "pilot",
            "eval_every": "flag" if sources.get("eval_every") == "flag" else "pilot"}


def run_with_pilot(config: Config, sources: dict[str, str], out: str, overwrite: bool,
                   resume: bool, progress: bool, train: Callable[..., str]) -> str:
    """The run `out` with its length chosen by the pilot. train: runner.train_and_evaluate."""
    if config.model_range is not None or jax.process_count() > 1:
        raise UserError("the pilot chooses the training length from the first models of the "
                        "whole run, which one part does not train; give --epochs (what a "
                        "single-process run's pilot chose, 'epochs' in its config.json) or "
                        "--no-pilot")
    base = os.path.abspath(out).rstrip(os.sep) + ".pilot"
    if overwrite:
        shutil.rmtree(base, ignore_errors=True)
    elif os.path.isdir(base) and not resume:
        raise UserError(f"an interrupted run's pilot was found in {base}; pass --resume to "
                        "continue it, or --overwrite to start again")
    elif os.path.isdir(base) and merged_earlier(config, sources, out):
        shutil.rmtree(base)  # killed once the run directory was written
        return out
    # --resume continues an interrupted run, one started with --overwrite too
    check_output_dir(out, overwrite or resume and os.path.isdir(base))
    models, sources = pilot_models(config, base), chosen_sources(sources)
    recorded = {"setting_sources": sources}
    tried = []
    for epochs in lengths(config.epochs):
        part = os.path.join(base, f"epochs-{epochs:03d}")
        if not os.path.exists(os.path.join(part, "metrics.json")):
            part_config = dataclasses.replace(at_length(config, sources, epochs),
                                              model_range=f"0:{models.count}", until_se=None)
            train(part_config, part, resume=resume, progress=progress, recorded=recorded)
        with open(os.path.join(part, "metrics.json")) as f:
            tried.append(length_record(epochs, json.load(f)))
        if tried[-1]["train_acc"] is None or tried[-1]["train_acc"] >= config.fit_threshold:
            break
    chosen = at_length(config, sources, tried[-1]["epochs"])
    record = pilot_record(chosen, models, tried)
    tqdm.write(record["line"])
    if record["warning"]:
        tqdm.write(f"WARNING: {record['warning']}")
    parts = [part]
    if models.count < config.num_models:
        parts.append(os.path.join(base, "rest"))
        if not os.path.exists(os.path.join(parts[-1], "metrics.json")):
            prior = load_run(part, all_models=True) if config.until_se is not None else None
            train(dataclasses.replace(chosen, model_range=f"{models.count}:{config.num_models}"),
                  parts[-1], resume=resume, progress=progress, prior=prior, recorded=recorded)
    merge_runs(parts, out, overwrite=overwrite, pilot=record)
    shutil.rmtree(base)
    return out


def merged_earlier(config: Config, sources: dict[str, str], out: str) -> bool:
    """On resume: is `out` the run directory this run's pilot merged before it was stopped (its
    pilot work not yet removed)? Refused when its settings or its number of models differ."""
    if not os.path.exists(os.path.join(out, "metrics.json")):
        return False
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    now = at_length(config, sources, written["epochs"])
    check_same(written["fingerprints"], {"settings": settings_hash(now.to_dict())},
               f"refusing to resume: {out} was written with other settings")
    if written["num_models"] != config.num_models:
        raise UserError(f"refusing to resume: {out} holds {written['num_models']} models, not "
                        f"{config.num_models}; add models with --grow")
    return True


def length_record(epochs: int, metrics: dict) -> dict:
    """What the pilot keeps of one tried length's part: its own-subset accuracy, its seconds,
    its waves and their work (training, evaluation and checkpoint seconds)."""
    return {"epochs": epochs, "train_acc": metrics["train_acc"],
            "seconds": metrics["wall_time_s"],
            "waves": len(metrics["peak_memory_bytes_per_wave"]),
            "work_seconds": sum(metrics[f"{part}_seconds"] for part in ("train", "eval",
                                                                         "checkpoint"))}


def grown_length(config: Config, sources: dict[str, str], run_dir: str) -> Config:
    """For --grow: the length the finished run's pilot chose, unless --epochs is given (the
    recipe's guess would differ from the models being added to)."""
    path = os.path.join(run_dir, "config.json")
    if sources.get("epochs") == "flag" or not os.path.exists(path):
        return config
    with open(path) as f:
        recorded = json.load(f)
    if recorded.get("setting_sources", {}).get("epochs") != "pilot":
        return config
    return at_length(config, sources, recorded["epochs"])


def pilot_record(config: Config, models: PilotModels, tried: list[dict]) -> dict:
    """metrics.json's `pilot`: what the pilot tried and found, what it cost, and the line and
    warning the run prints. config: the run at the chosen length. The share of the run is
    projected from the chosen length's measured times: the rest repeats its work (training,
    evaluation, checkpoints) per wave for each of its own waves, of the size the pilot's were
    (GPU, TPU), or per model for each of its models (CPU), and once what the length spent
    besides (loading, compiling, scoring, writing)."""
    last = tried[-1]
    fits = last["train_acc"] is not None and last["train_acc"] >= config.fit_threshold
    found = ", ".join("diverged" if t["train_acc"] is None else
                      f"{t['train_acc']:.3f} at {t['epochs']}" for t in tried) + " epochs"
    seconds = sum(t["seconds"] for t in tried)
    remaining, waves_trained = config.num_models - models.count, max(last["waves"], 1)
    repeated = (math.ceil(remaining * waves_trained / models.count) / waves_trained
                if models.by_wave else remaining / models.count)  # in the chosen length's work
    rest = last["seconds"] + (repeated - 1) * last["work_seconds"] if remaining else 0.0
    return {
        "models": models.count, "cap_epochs": CAP_EPOCHS, "target": config.fit_threshold,
        "tried": tried, "found": found, "chosen_epochs": config.epochs, "fits": fits,
        "seconds": seconds, "unused_seconds": seconds - last["seconds"],
        "line": (f"pilot: {found}: training {config.epochs} epochs ({models.said}; "
                 f"{seconds:.0f} s, about {100 * seconds / (seconds + rest):.0f}% of the run)"),
        "warning": None if fits else not_fitted_warning(config, last["train_acc"]),
    }


def not_fitted_warning(config: Config, found: float | None) -> str:
    """What the run says before the ensemble when the capped schedule does not fit."""
    names = list(ARCHS)
    larger = names[names.index(config.arch) + 1] if config.arch != names[-1] else None
    instead = " or ".join(([f"a larger --arch ({larger})"] if larger else []) + (
        [f"a smaller --batch-size ({config.batch_size // 2})"]
        if config.batch_size > recipes.MIN_BATCH else []))
    reached = "diverged" if found is None else f"fit {found:.3f} of their own subsets"
    return (f"The pilot's {config.arch} models {reached} after {config.epochs} epochs, the "
            f"longest schedule it tries, below the fit target {config.fit_threshold:g}: "
            f"memorization may not show; try {instead or 'another --arch'}.")
