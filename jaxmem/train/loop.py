"""The run loop: waves of models, epochs of per-model batches, evaluation at chosen epochs.

Returns everything the estimator needs (masks and correctness), not only the scores. With a
`WorkDir` every finished wave and every epoch of the wave in progress are saved, so a killed run
resumes where it stopped and gives the same results.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxmem import models
from jaxmem.analysis import scores as scores_lib
from jaxmem.config import Config
from jaxmem.data import Dataset
from jaxmem.errors import UserError
from jaxmem.train import keys, lowering
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.ensemble import Ensemble, make_mesh
from jaxmem.train.masks import subset_masks, subset_size
from jaxmem.train.optim import make_optimizer
from jaxmem.train.step import StepSpec

# Per-model arrays of a wave (model axis second for [E, m, ...] / [epochs, m]).
WAVE_ARRAYS = ("correct_train", "correct_test", "train_loss", "train_batch_acc")


class DivergedError(UserError):
    """Some models' loss became NaN/inf and --drop-diverged was not given."""


@dataclasses.dataclass
class EnsembleResult:
    """Outputs of training K models. E = evaluated epochs.

    model_indices [K]; masks [K,N] bool; correct_train [E,K,N] bool; correct_test
    [E,K,N_test] bool; train_loss, train_batch_acc [epochs, K] (masked means over each epoch);
    diverged [K] bool; timings in seconds; peak device memory per wave in bytes (None if the
    backend does not report it).
    """

    model_indices: np.ndarray
    masks: np.ndarray
    epochs: list[int]
    correct_train: np.ndarray
    correct_test: np.ndarray
    train_loss: np.ndarray
    train_batch_acc: np.ndarray
    diverged: np.ndarray
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    devices: list[str] = dataclasses.field(default_factory=list)
    peak_memory_bytes: list[int | None] = dataclasses.field(default_factory=list)


def build_spec(config: Config, dataset: Dataset, steps_per_epoch: int) -> StepSpec:
    conv_impl, _ = lowering.resolve(config.conv_impl, config.ensemble)
    model = models.create(config.arch, dataset.num_classes, conv_impl=conv_impl,
                          dtype=config.dtype)
    flip = dataset.flip if config.flip is None else config.flip
    translate = dataset.translate if config.translate is None else config.translate
    return StepSpec(model, make_optimizer(config, steps_per_epoch), dataset.num_classes,
                    dataset.mean, dataset.std, flip, translate, config.label_smoothing)


def steps_per_epoch(num_examples: int, subset_ratio: float, batch_size: int) -> int:
    """Every model's epoch is its own subset: round(r*N) examples in whole batches."""
    return math.ceil(subset_size(num_examples, subset_ratio) / batch_size)


def model_orders(seed: int, model_indices, masks, epoch: int, steps: int, batch_size: int,
                 sharding=None):
    """[M, steps*B] int32: each model's example order for an epoch, its own subset (mask row)
    shuffled by a key from (seed, model index, epoch) alone, padded with N (= no example) to
    whole batches. Every row of masks holds the same number of examples (masks.py).
    With `sharding` (the model axis over the devices) each device draws its own models' orders
    and the result stays there, instead of one device drawing all of them."""
    size = int(masks[0].sum())
    order_keys = keys.model_keys(seed, keys.ORDER, np.asarray(model_indices))
    masks = jnp.asarray(masks)
    if sharding is not None:
        order_keys, masks = jax.device_put((order_keys, masks), sharding)
    return _orders(order_keys, masks, epoch, size, steps * batch_size)


@functools.partial(jax.jit, static_argnames=("size", "length"))
def _orders(order_keys, masks, epoch, size: int, length: int):
    def one(key, mask):
        members = jnp.nonzero(mask, size=size)[0].astype(jnp.int32)
        shuffled = jax.random.permutation(jax.random.fold_in(key, epoch), members)
        return jnp.pad(shuffled, (0, length - size), constant_values=mask.shape[0])

    return jax.vmap(one)(order_keys, masks)


def wave_slices(num_models: int, per_wave: int, num_devices: int) -> list[tuple[int, int, int]]:
    """[(start, stop, padded size)]: waves of at most per_wave models, each padded up to a
    multiple of the device count so that every device holds the same number of models."""
    per_wave = per_wave or num_models
    waves = []
    for start in range(0, num_models, per_wave):
        stop = min(start + per_wave, num_models)
        waves.append((start, stop, math.ceil((stop - start) / num_devices) * num_devices))
    return waves


# Share of a device's free memory a wave may plan to use (the rest: fragmentation, eval, XLA).
MEMORY_FRACTION = 0.7


def auto_wave_size(trainer: Trainer, num_models: int) -> int:
    """Models per wave that fit the devices' free memory, from the compiled step's memory use
    for one model per device. Backends that do not report memory (CPU) get one wave."""
    free = free_device_memory(trainer.mesh.devices.flat)
    if free is None:
        return num_models
    count = trainer.mesh.size
    sharded = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=trainer.ensemble.model_sharding)
    keys_shape = sharded((count, 2), jnp.uint32)
    states = jax.eval_shape(trainer.ensemble.init, keys_shape)
    compiled = trainer.ensemble.train_step.lower(
        states, sharded((count, 3), jnp.float32),
        sharded((count, trainer.steps * trainer.config.batch_size), jnp.int32), keys_shape,
        trainer.x_train, trainer.y_train, 0).compile()
    usage = compiled.memory_analysis()
    per_model = (usage.argument_size_in_bytes + usage.output_size_in_bytes
                 - usage.alias_size_in_bytes + usage.temp_size_in_bytes)
    per_device = max(1, int(MEMORY_FRACTION * free // max(per_model, 1)))
    return min(num_models, per_device * count)


def free_device_memory(devices) -> int | None:
    """Smallest free memory over the devices in bytes; None where it is not reported."""
    stats = [d.memory_stats() for d in devices]
    if any(not s or "bytes_limit" not in s for s in stats):
        return None
    return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)


def peak_memory(devices) -> int | None:
    """Largest peak bytes in use over the devices, where the backend reports it (GPU, TPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


class Trainer:
    """Trains waves of models of one run on one mesh; data is put on the devices once."""

    def __init__(self, config: Config, dataset: Dataset, devices=None):
        self.config, self.dataset = config, dataset
        self.steps = steps_per_epoch(dataset.num_train, config.subset_ratio, config.batch_size)
        _, strategy = lowering.resolve(config.conv_impl, config.ensemble)
        self.mesh = make_mesh(devices)
        self.ensemble = Ensemble(build_spec(config, dataset, self.steps), dataset.image_shape,
                                 config.batch_size, self.mesh, strategy)
        put = lambda a: jax.device_put(a, self.ensemble.replicated)  # noqa: E731
        self.x_train, self.y_train = put(dataset.x_train), put(dataset.y_train)
        self.x_test, self.y_test = put(dataset.x_test), put(dataset.y_test)
        self.eval_epochs = config.eval_epochs()

    def empty_wave(self, count: int) -> dict[str, np.ndarray]:
        e, epochs = len(self.eval_epochs), self.config.epochs
        return {"correct_train": np.zeros((e, count, self.dataset.num_train), bool),
                "correct_test": np.zeros((e, count, self.dataset.num_test), bool),
                "train_loss": np.zeros((epochs, count)),
                "train_batch_acc": np.zeros((epochs, count)),
                "epochs_done": np.int64(0), "train_seconds": np.float64(0),
                "eval_seconds": np.float64(0)}

    def train_wave(self, wave: int, indices: np.ndarray, masks: np.ndarray, padded: int,
                   bar, work: WorkDir | None) -> dict[str, np.ndarray]:
        """Train the models `indices` (masks [m, N]) as one wave padded to `padded` models
        (padding repeats the last model; its results are dropped). Returns the wave's arrays."""
        config, ensemble = self.config, self.ensemble
        real = len(indices)
        rows = np.minimum(np.arange(padded), real - 1)
        wave_indices = indices[rows]
        # [padded, N] on the devices of their models: the source of every epoch's orders
        wave_masks = jax.device_put(masks[rows], ensemble.model_sharding)
        init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, wave_indices))
        states = ensemble.init(jax.device_put(init_keys, ensemble.model_sharding))
        if config.init_from:
            states = self._load_pretrained(states)
        result = self.empty_wave(real)
        restored = work.restore_epoch(wave, states) if work else None
        if restored is not None:
            epochs_done, states, result = restored
            bar.update(int(epochs_done) * self.steps)
        aug_base = keys.model_keys(config.seed, keys.AUGMENT, wave_indices)
        for epoch in range(int(result["epochs_done"]), config.epochs):
            tic = time.perf_counter()
            aug_keys = jax.device_put(jax.random.key_data(jax.vmap(
                lambda k, e=epoch: jax.random.fold_in(k, e))(aug_base)), ensemble.model_sharding)
            orders = model_orders(config.seed, wave_indices, wave_masks, epoch, self.steps,
                                  config.batch_size, ensemble.model_sharding)
            totals = jax.device_put(jnp.zeros((padded, 3), jnp.float32), ensemble.model_sharding)
            in_flight = collections.deque()
            for step in range(self.steps):
                states, totals = ensemble.train_step(states, totals, orders, aug_keys,
                                                     self.x_train, self.y_train, step)
                # Wait on the metrics of two steps back: the bar shows real progress without
                # a sync every step.
                in_flight.append(totals)
                if len(in_flight) > 2:
                    in_flight.popleft().block_until_ready()
                bar.update(1)
            totals = np.asarray(totals)[:real]
            result["train_seconds"] += time.perf_counter() - tic
            weight = np.maximum(totals[:, 2], 1.0)
            result["train_loss"][epoch] = totals[:, 0] / weight
            result["train_batch_acc"][epoch] = totals[:, 1] / weight
            bad = ~np.isfinite(result["train_loss"][epoch])
            if bad.any() and not config.drop_diverged:
                where = f"; the checkpoints in {work.path} are intact" if work else ""
                raise DivergedError(
                    f"models {', '.join(map(str, indices[bad]))} diverged (loss NaN/inf) in "
                    f"epoch {epoch + 1}{where}; lower --lr, or pass --drop-diverged to "
                    "exclude them from the scores")
            if epoch + 1 in self.eval_epochs:
                tic = time.perf_counter()
                e, size = self.eval_epochs.index(epoch + 1), config.eval_batch_size
                result["correct_train"][e] = ensemble.correct_on(
                    states, self.x_train, self.y_train, size)[:real]
                result["correct_test"][e] = ensemble.correct_on(
                    states, self.x_test, self.y_test, size)[:real]
                result["eval_seconds"] += time.perf_counter() - tic
            result["epochs_done"] = np.int64(epoch + 1)
            if work and epoch + 1 < config.epochs:
                work.save_epoch(wave, epoch + 1, states, result)
            loss = np.nanmean(result["train_loss"][epoch]) if not bad.all() else np.nan
            bar.set_postfix(wave=wave + 1, epoch=epoch + 1, loss=f"{loss:.3f}",
                            acc=f"{result['train_batch_acc'][epoch].mean():.3f}")
        result["peak_memory_bytes"] = np.int64(peak_memory(self.mesh.devices.flat) or -1)
        return result

    def _load_pretrained(self, states):
        from jaxmem.models.pretrained import load_timm_vit

        params = load_timm_vit(self.config.init_from, jax.device_get(states.params),
                               self.config.arch)
        return states._replace(params=jax.device_put(params, self.ensemble.model_sharding))


def train_ensemble(config: Config, dataset: Dataset, model_indices=None, devices=None,
                   progress: bool = True, work: WorkDir | None = None) -> EnsembleResult:
    """Train models `model_indices` (default: config.model_indices()) of the run.

    With config.until_se, waves stop as soon as every example's standard error is below it.
    """
    indices = np.asarray(config.model_indices() if model_indices is None else model_indices)
    trainer = Trainer(config, dataset, devices)
    masks = subset_masks(config.seed, indices, dataset.num_train, config.subset_ratio)
    per_wave = config.models_per_wave or auto_wave_size(trainer, len(indices))
    waves = wave_slices(len(indices), per_wave, trainer.ensemble.num_devices)
    bar = tqdm(total=len(waves) * config.epochs * trainer.steps, unit="step",
               disable=not progress, dynamic_ncols=True)
    done = []
    for wave, (start, stop, padded) in enumerate(waves):
        arrays = work.load_wave(wave) if work else None
        if arrays is None:
            arrays = trainer.train_wave(wave, indices[start:stop], masks[start:stop], padded,
                                        bar, work)
            if work:
                work.save_wave(wave, arrays)
        else:
            bar.update(config.epochs * trainer.steps)
        done.append(arrays)
        if config.until_se is not None and below_target_se(masks[:stop], done, config):
            bar.write(f"every standard error is below {config.until_se} after {stop} models")
            break
    bar.close()
    used = sum(a["train_loss"].shape[1] for a in done)
    stacked = {name: np.concatenate([a[name] for a in done], axis=1) for name in WAVE_ARRAYS}
    diverged = ~np.isfinite(stacked["train_loss"]).all(axis=0)
    return EnsembleResult(
        indices[:used], masks[:used], trainer.eval_epochs, stacked["correct_train"],
        stacked["correct_test"], stacked["train_loss"], stacked["train_batch_acc"], diverged,
        float(sum(a["train_seconds"] for a in done)), float(sum(a["eval_seconds"] for a in done)),
        [str(d) for d in trainer.mesh.devices.flat],
        [int(a["peak_memory_bytes"]) if a["peak_memory_bytes"] >= 0 else None for a in done])


def below_target_se(masks: np.ndarray, waves: list[dict], config: Config) -> bool:
    """Is the largest per-example standard error (last evaluated epoch) below --until-se?"""
    correct = np.concatenate([w["correct_train"][-1] for w in waves], axis=0)
    keep = np.isfinite(np.concatenate([w["train_loss"] for w in waves], axis=1)).all(axis=0)
    scores = scores_lib.memorization_scores(masks[keep], correct[keep], config.min_count)
    return not scores["low_count"].any() and np.nanmax(scores["memorization_se"]) < config.until_se
