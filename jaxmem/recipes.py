"""Recipes: the settings a user does not give, chosen for the dataset.

Memorization is measured in models that interpolate their training data: an atypical example
(a rare sub-population, a changed label) is memorized when models that train on it get it
right and models that hold it out do not. A model that has not fitted its own subset gets such
an example wrong whether it trained on it or not, and its scores show nothing.

- The paper's datasets (CIFAR-10, CIFAR-100, Tiny ImageNet): the paper's recipe, which is
  `Config`'s defaults: 100 epochs of batch 512, SGD with Nesterov momentum 0.9, the triangular
  learning rate peaking at 0.4, weight decay 5e-4, flips and translations.
- Every other dataset (MNIST, Fashion-MNIST, `tfds:`, `folder:`, a user's `.npz`) is loaded to
  count its examples: one whose subsets hold at least 25 batches of 512 (MNIST's 42,000 at
  r = 0.7: 82) gets the paper's recipe; smaller data gets the small-data recipe.
- Small data (the embedded sets; any dataset whose subsets are fewer than 25 batches of 512): at
  batch 512 a subset of a few thousand images is a handful of SGD steps per epoch, far too few
  to fit it (1,400 images: 2 steps per epoch, own-subset accuracy 0.75 after 24 epochs). The
  small-data recipe keeps the paper's optimiser and schedule but takes the largest power-of-two
  batch giving at least MIN_STEPS_PER_EPOCH steps per epoch (16 to 512), scales the peak
  learning rate with the square root of the batch (0.4 at 512: 0.1 at 32; linear scaling, 0.025
  at 32, left the models short of fitting), trains for at least MIN_TOTAL_STEPS steps and
  MIN_EPOCHS epochs, and does not translate images below 32 pixels (on 8x8 digits a 1-pixel
  shift kept the models from fitting changed labels: own-subset accuracy 0.97, changed labels
  found with AUC 0.5, against 1.000 and AUC 1.0 without it).
  Measured (tiny_cnn, 2 CPU cores): a 1,400-image 16x16 file with planted sub-populations, K =
  48: own-subset accuracy 1.000, singletons scoring 0.91 on average, groups of 8 and more 0.00;
  digits with 30 labels changed, K = 32: the 30 changed labels are the 30 highest scores.
  The recipe works from what the user gave: a given batch size gets its own learning rate
  (the same square-root rule) and enough epochs for MIN_TOTAL_STEPS; given epochs get about
  EVALUATIONS evaluations. The epochs it chooses are a starting point: on data the recipe
  was not measured on, a pilot (`jaxmem/train/pilot.py`) lengthens them until the models fit.

`resolve` records where every setting came from (flag, recipe or default; "pilot" once the
pilot chose the epochs); the run directory keeps that record in config.json.
"""

from __future__ import annotations

import dataclasses
import math

from jaxmem.config import Config
from jaxmem.masks import subset_size

RECIPE_SETTINGS = ("epochs", "batch_size", "lr", "eval_every", "translate")
PAPER_DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "tfds:cifar10", "tfds:cifar100")
PAPER_BATCH, PAPER_LR = 512, 0.4
MIN_STEPS_PER_EPOCH = 25
MIN_TOTAL_STEPS = 500
MIN_BATCH = 16
MIN_EPOCHS = 18
MIN_TRANSLATED_SIZE = 32  # smaller images are not translated
EVALUATIONS = 6  # evaluated epochs of a small-data run (every epochs // EVALUATIONS, and the last)


def small_data_recipe(num_train: int, subset_ratio: float, image_size: int,
                      given: dict | None = None) -> dict:
    """Batch size, peak learning rate, epochs, evaluation interval and translation for a
    training set of num_train images of side image_size (each model trains on round(r *
    num_train) of them). given: the settings the user gave; the others are computed from them
    (a given batch size gets its own learning rate and enough epochs for MIN_TOTAL_STEPS,
    given epochs get about EVALUATIONS evaluations), and given ones are left out."""
    given = given or {}
    subset = subset_size(num_train, subset_ratio)
    if subset / PAPER_BATCH >= MIN_STEPS_PER_EPOCH:  # not small: the paper's recipe
        return {}
    batch = PAPER_BATCH
    while batch > MIN_BATCH and subset / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    batch = given.get("batch_size", batch)
    steps = math.ceil(subset / batch)
    epochs = given.get("epochs", max(MIN_EPOCHS, math.ceil(MIN_TOTAL_STEPS / steps)))
    recipe = {"batch_size": batch, "lr": PAPER_LR * math.sqrt(batch / PAPER_BATCH),
              "epochs": epochs, "eval_every": evaluation_interval(epochs)}
    if image_size < MIN_TRANSLATED_SIZE:
        recipe["translate"] = 0
    return {k: v for k, v in recipe.items() if k not in given}


def evaluation_interval(epochs: int) -> int:
    """Evaluate every this many epochs: about EVALUATIONS evaluations (and always the last)."""
    return max(1, epochs // EVALUATIONS)


def recipe(config: Config, given: dict | None = None) -> dict:
    """The recipe's settings for the config's dataset, computed from those `given` (empty for
    the paper's datasets: Config's defaults are the paper's recipe). Other data is loaded to
    count its training examples."""
    if config.dataset in PAPER_DATASETS:
        return {}
    from jaxmem import data

    loaded = data.load_for(config)
    return small_data_recipe(loaded.num_train, config.subset_ratio, min(loaded.image_shape[:2]),
                             given)


def resolve(given: dict) -> tuple[Config, dict[str, str]]:
    """Config from the settings the user gave, the dataset's recipe for the rest, and Config's
    defaults; with {setting: "flag" | "recipe" | "default"}."""
    base = Config(**given)  # validates what was given
    from_recipe = recipe(base, given)
    config = dataclasses.replace(base, **from_recipe)
    sources = {field.name: "flag" if field.name in given else
               "recipe" if field.name in from_recipe else "default"
               for field in dataclasses.fields(Config)}
    return config, sources
