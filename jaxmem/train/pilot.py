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
With doubling, the pilot costs P models at every tried length; the last one is reused. P is
max(2, devices) (at most K): two models give a mean over two subsets, and on several devices
one model per device costs no more time than one. On a CPU an epoch costs about as much per
model in a wave of 2 as in a wave of 30 (a wave of 30 was up to a third slower per model:
BENCHMARKS.md), so at K = 32, P = 2 and 18 -> 36 -> 72 epochs the pilot trains
2 x (18 + 36 + 72) = 252 model-epochs besides the other 30 x 72 = 2,160 (about 10% of the
run's time; 2 x (18 + 36) = 108 model-epochs, 4.7% on top of 32 x 72, are not reused). On a
GPU a wave of P models runs far below the device's throughput, so there the share is larger.

The work lives in `<out>.pilot/`: one finished part run directory per tried length
(`epochs-018`, ...) and the checkpoints of the length in progress (`epochs-036.partial`), so a
killed run resumed with `--resume` redoes neither a finished length nor the finished epochs of
the one in progress. It is removed once the run directory is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

import jax
from tqdm.auto import tqdm

from jaxmem import recipes
from jaxmem.config import Config
from jaxmem.errors import UserError
from jaxmem.models import ARCHS
from jaxmem.rundir import load_run, merge_runs

CAP_EPOCHS = 400  # the longest schedule tried (the paper's models: 100 epochs)
MIN_PILOT_MODELS = 2


def wanted(config: Config, sources: dict[str, str]) -> bool:
    """Does this run start with a pilot? When the epochs are the small-data recipe's guess
    (neither given nor the paper's) and `--no-pilot` was not given."""
    return config.pilot and sources.get("epochs") == "recipe"


def pilot_models(config: Config, base: str) -> int:
    """P, the models the pilot trains at every length (see the module docstring), or, on
    resume, the number its finished lengths in `base` hold (the device count may differ)."""
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        path = os.path.join(base, name, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                return int(json.load(f)["model_range"].split(":")[1])
    return min(config.num_models, max(MIN_PILOT_MODELS, jax.device_count()))


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
    count, sources = pilot_models(config, base), chosen_sources(sources)
    recorded = {"setting_sources": sources}
    tried = []
    for epochs in lengths(config.epochs):
        part = os.path.join(base, f"epochs-{epochs:03d}")
        if not os.path.exists(os.path.join(part, "metrics.json")):
            part_config = dataclasses.replace(at_length(config, sources, epochs),
                                              model_range=f"0:{count}", until_se=None)
            train(part_config, part, resume=resume, progress=progress, recorded=recorded)
        with open(os.path.join(part, "metrics.json")) as f:
            metrics = json.load(f)
        tried.append({"epochs": epochs, "train_acc": metrics["train_acc"],
                      "seconds": metrics["wall_time_s"]})
        if metrics["train_acc"] is None or metrics["train_acc"] >= config.fit_threshold:
            break
    chosen = at_length(config, sources, tried[-1]["epochs"])
    record = pilot_record(chosen, count, tried)
    tqdm.write(record["line"])
    if record["warning"]:
        tqdm.write(f"WARNING: {record['warning']}")
    parts = [part]
    if count < config.num_models:
        prior = load_run(part, all_models=True) if config.until_se is not None else None
        parts.append(train(dataclasses.replace(chosen, model_range=f"{count}:{config.num_models}"),
                           out, overwrite=overwrite, resume=resume, progress=progress,
                           prior=prior, recorded=recorded))
    merge_runs(parts, out, overwrite=True, pilot=record)
    shutil.rmtree(base)
    return out


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


def pilot_record(config: Config, count: int, tried: list[dict]) -> dict:
    """metrics.json's `pilot`: what the pilot tried and found, what it cost, and the line and
    warning the run prints. config: the run at the chosen length."""
    last = tried[-1]["train_acc"]
    fits = last is not None and last >= config.fit_threshold
    found = ", ".join("diverged" if t["train_acc"] is None else
                      f"{t['train_acc']:.3f} at {t['epochs']}" for t in tried) + " epochs"
    seconds = sum(t["seconds"] for t in tried)
    rate = seconds / (count * sum(t["epochs"] for t in tried))  # per model-epoch
    rest = rate * (config.num_models - count) * config.epochs
    return {
        "models": count, "cap_epochs": CAP_EPOCHS, "target": config.fit_threshold,
        "tried": tried, "found": found, "chosen_epochs": config.epochs, "fits": fits,
        "seconds": seconds, "unused_seconds": seconds - tried[-1]["seconds"],
        "line": (f"pilot: {found}: training {config.epochs} epochs ({count} models, "
                 f"{seconds:.0f} s, about {100 * seconds / (seconds + rest):.0f}% of the run)"),
        "warning": None if fits else not_fitted_warning(config, last),
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
