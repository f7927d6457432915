"""Recipes: the settings a user does not give, chosen for the dataset.

Memorization is measured in models that interpolate their training data: an atypical example
(a rare sub-population, a changed label) is memorized when models that train on it get it
right and models that hold it out do not. A model that has not fitted its own subset gets such
an example wrong whether it trained on it or not, and its scores show nothing.

- The paper's datasets (CIFAR-10, CIFAR-100, Tiny ImageNet): the paper's recipe, which is
  `Config`'s defaults: 100 epochs of batch 512, SGD with Nesterov momentum 0.9, the triangular
  learning rate peaking at 0.4, weight decay 5e-4, flips and translations.
- Small data (the embedded sets, a user's `.npz`): at batch 512 a subset of a few thousand
  images is a handful of SGD steps per epoch, far too few to fit it (1,400 images: 2 steps per
  epoch, own-subset accuracy 0.75 after 24 epochs). The small-data recipe keeps the paper's
  optimiser and schedule but takes a batch that gives at least MIN_STEPS_PER_EPOCH steps per
  epoch, scales the peak learning rate linearly with the batch (0.4 at 512), and trains for
  at least MIN_TOTAL_STEPS steps.

`resolve` records where every setting came from (flag, recipe or default); the run directory
keeps that record in config.json.
"""

from __future__ import annotations

import dataclasses
import math

from jaxmem.config import Config
from jaxmem.masks import subset_size

RECIPE_SETTINGS = ("epochs", "batch_size", "lr", "eval_every")
PAPER_DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "tfds:cifar10", "tfds:cifar100")
PAPER_BATCH, PAPER_LR = 512, 0.4
MIN_STEPS_PER_EPOCH = 8
MIN_TOTAL_STEPS = 1000
MIN_BATCH = 32
MIN_EPOCHS = 30
EVALUATIONS = 6  # evaluated epochs of a small-data run (every epochs // EVALUATIONS, and the last)


def small_data_recipe(num_train: int, subset_ratio: float) -> dict:
    """Batch size, peak learning rate, epochs and evaluation interval for a training set of
    num_train examples (each model trains on round(r * num_train) of them)."""
    subset = subset_size(num_train, subset_ratio)
    batch = PAPER_BATCH
    while batch > MIN_BATCH and math.ceil(subset / batch) < MIN_STEPS_PER_EPOCH:
        batch //= 2
    steps = math.ceil(subset / batch)
    epochs = max(MIN_EPOCHS, math.ceil(MIN_TOTAL_STEPS / steps))
    return {"batch_size": batch, "lr": PAPER_LR * batch / PAPER_BATCH, "epochs": epochs,
            "eval_every": max(1, epochs // EVALUATIONS)}


def recipe(dataset: str, data_dir: str | None, subset_ratio: float) -> dict:
    """The recipe's settings for a dataset (empty for the paper's datasets: Config's defaults
    are the paper's recipe). Small data is loaded to count its training examples."""
    if dataset in PAPER_DATASETS:
        return {}
    from jaxmem import data

    return small_data_recipe(data.load(dataset, data_dir).num_train, subset_ratio)


def resolve(given: dict) -> tuple[Config, dict[str, str]]:
    """Config from the settings the user gave, the dataset's recipe for the rest, and Config's
    defaults; with {setting: "flag" | "recipe" | "default"}."""
    base = Config(**given)  # validates what was given
    chosen = recipe(base.dataset, base.data_dir, base.subset_ratio)
    from_recipe = {k: v for k, v in chosen.items() if k not in given}
    config = dataclasses.replace(base, **from_recipe)
    sources = {field.name: "flag" if field.name in given else
               "recipe" if field.name in from_recipe else "default"
               for field in dataclasses.fields(Config)}
    return config, sources
