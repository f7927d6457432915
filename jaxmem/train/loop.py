"""The run loop: waves of models, epochs of shared batches, evaluation at chosen epochs.

Returns everything the estimator needs (masks and correctness), not only the scores.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxmem import models
from jaxmem.config import Config
from jaxmem.data import Dataset
from jaxmem.train import keys, lowering
from jaxmem.train.ensemble import Ensemble, make_mesh
from jaxmem.train.masks import subset_masks
from jaxmem.train.optim import make_optimizer
from jaxmem.train.step import StepSpec


@dataclasses.dataclass
class EnsembleResult:
    """Outputs of training K models. E = evaluated epochs.

    masks [K,N] bool; correct_train [E,K,N] bool; correct_test [E,K,N_test] bool;
    train_loss, train_batch_acc [epochs, K] (masked running means during each epoch);
    timings in seconds.
    """

    model_indices: np.ndarray
    masks: np.ndarray
    epochs: list[int]
    correct_train: np.ndarray
    correct_test: np.ndarray
    train_loss: np.ndarray
    train_batch_acc: np.ndarray
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    devices: list[str] = dataclasses.field(default_factory=list)


def build_spec(config: Config, dataset: Dataset, steps_per_epoch: int) -> StepSpec:
    conv_impl, _ = lowering.resolve(config.conv_impl, config.ensemble)
    model = models.create(config.arch, dataset.num_classes, conv_impl=conv_impl,
                          dtype=config.dtype)
    flip = dataset.flip if config.flip is None else config.flip
    translate = dataset.translate if config.translate is None else config.translate
    return StepSpec(model, make_optimizer(config, steps_per_epoch), dataset.num_classes,
                    dataset.mean, dataset.std, flip, translate, config.label_smoothing)


def epoch_order(seed: int, epoch: int, num_examples: int, steps: int, batch_size: int):
    """[steps*B] int32: the shared example order of an epoch (from seed and epoch alone),
    padded with N (= no example) to whole batches."""
    key = jax.random.fold_in(keys.purpose_key(seed, keys.ORDER), epoch)
    order = jax.random.permutation(key, num_examples).astype(jnp.int32)
    return jnp.pad(order, (0, steps * batch_size - num_examples), constant_values=num_examples)


def wave_slices(num_models: int, per_wave: int, num_devices: int) -> list[tuple[int, int, int]]:
    """[(start, stop, padded size)]: waves of at most per_wave models, each padded up to a
    multiple of the device count so that every device holds the same number of models."""
    per_wave = per_wave or num_models
    waves = []
    for start in range(0, num_models, per_wave):
        stop = min(start + per_wave, num_models)
        waves.append((start, stop, math.ceil((stop - start) / num_devices) * num_devices))
    return waves


def train_ensemble(config: Config, dataset: Dataset, model_indices=None, devices=None,
                   progress: bool = True) -> EnsembleResult:
    """Train models `model_indices` (default 0..K-1) of the run described by config."""
    model_indices = np.arange(config.num_models) if model_indices is None else np.asarray(
        model_indices)
    num_train, batch_size = dataset.num_train, config.batch_size
    steps = math.ceil(num_train / batch_size)
    spec = build_spec(config, dataset, steps)
    _, strategy = lowering.resolve(config.conv_impl, config.ensemble)
    mesh = make_mesh(devices)
    ensemble = Ensemble(spec, dataset.image_shape, batch_size, mesh, strategy)

    rep = ensemble.replicated
    x_train, y_train = jax.device_put(dataset.x_train, rep), jax.device_put(dataset.y_train, rep)
    x_test, y_test = jax.device_put(dataset.x_test, rep), jax.device_put(dataset.y_test, rep)
    masks = subset_masks(config.seed, model_indices, num_train, config.subset_ratio)
    eval_epochs = config.eval_epochs()
    num_models = len(model_indices)
    correct_train = np.zeros((len(eval_epochs), num_models, num_train), bool)
    correct_test = np.zeros((len(eval_epochs), num_models, dataset.num_test), bool)
    train_loss = np.zeros((config.epochs, num_models))
    train_batch_acc = np.zeros((config.epochs, num_models))
    timer = {"train": 0.0, "eval": 0.0}

    waves = wave_slices(num_models, config.models_per_wave, ensemble.num_devices)
    bar = tqdm(total=len(waves) * config.epochs * steps, unit="step", disable=not progress,
               dynamic_ncols=True)
    for wave_number, (start, stop, padded) in enumerate(waves):
        real = stop - start
        # Padding models repeat the wave's last model; their results are dropped.
        rows = np.minimum(np.arange(start, start + padded), stop - 1)
        wave_indices, wave_masks = model_indices[rows], masks[rows]
        wave_masks_dev = jax.device_put(wave_masks, ensemble.model_sharding)
        init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, wave_indices))
        states = ensemble.init(jax.device_put(init_keys, ensemble.model_sharding))
        aug_base = keys.model_keys(config.seed, keys.AUGMENT, wave_indices)
        for epoch in range(config.epochs):
            tic = time.perf_counter()
            aug_keys = jax.device_put(jax.random.key_data(jax.vmap(
                lambda k, e=epoch: jax.random.fold_in(k, e))(aug_base)), ensemble.model_sharding)
            order = epoch_order(config.seed, epoch, num_train, steps, batch_size)
            totals = jax.device_put(jnp.zeros((padded, 3), jnp.float32), ensemble.model_sharding)
            in_flight = collections.deque()
            for step in range(steps):
                states, totals = ensemble.train_step(states, totals, wave_masks_dev, aug_keys,
                                                     x_train, y_train, order, step)
                # Read metrics two steps behind: the bar shows real progress without a sync
                # every step.
                in_flight.append(totals)
                if len(in_flight) > 2:
                    in_flight.popleft().block_until_ready()
                bar.update(1)
            totals = np.asarray(totals)[:real]
            timer["train"] += time.perf_counter() - tic
            weight = np.maximum(totals[:, 2], 1.0)
            train_loss[epoch, start:stop] = totals[:, 0] / weight
            train_batch_acc[epoch, start:stop] = totals[:, 1] / weight
            if epoch + 1 in eval_epochs:
                tic = time.perf_counter()
                e = eval_epochs.index(epoch + 1)
                bs = config.eval_batch_size
                correct_train[e, start:stop] = ensemble.correct_on(states, x_train, y_train, bs)[
                    :real]
                correct_test[e, start:stop] = ensemble.correct_on(states, x_test, y_test, bs)[
                    :real]
                timer["eval"] += time.perf_counter() - tic
            done = (wave_number * config.epochs + epoch + 1) * steps * batch_size * real
            bar.set_postfix(wave=f"{wave_number + 1}/{len(waves)}", epoch=epoch + 1,
                            loss=f"{train_loss[epoch, start:stop].mean():.3f}",
                            acc=f"{train_batch_acc[epoch, start:stop].mean():.3f}",
                            model_ex_s=f"{done / max(timer['train'], 1e-9):.0f}")
    bar.close()
    return EnsembleResult(model_indices, masks, eval_epochs, correct_train, correct_test,
                          train_loss, train_batch_acc, timer["train"], timer["eval"],
                          [str(d) for d in mesh.devices.flat])
