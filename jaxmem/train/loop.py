"""The epoch loop: waves of models, epochs of per-model batches, evaluation at chosen epochs.

Returns everything the estimator needs (masks and correctness), not only the scores. With a
`WorkDir` every finished wave and the wave in progress are saved, so a killed run resumes
where it stopped and gives the same results.
"""

from __future__ import annotations

import collections
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxmem import estimator, keys, models
from jaxmem.config import Config
from jaxmem.data import Dataset
from jaxmem.errors import UserError
from jaxmem.rundir import EnsembleResult, Run, diverged_models
from jaxmem.rundir.heldout import HeldoutSums, combine
from jaxmem.rundir.record import TIMED_PARTS
from jaxmem.train import lowering
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.ensemble import Ensemble, make_mesh
from jaxmem.train.optim import make_optimizer
from jaxmem.train.orders import model_orders, steps_per_epoch
from jaxmem.train.step import StepSpec
from jaxmem.train.waves import auto_wave_size, peak_memory, reset_peak_memory, wave_slices

# Steps timed after the first (which compiles) for the plan's projected time.
PLAN_WARMUP_STEPS = 3
# Per-model arrays of a wave (model axis second for [E, m, ...] / [epochs, m]).
WAVE_ARRAYS = ("correct_train", "correct_test", "train_loss", "train_batch_acc")


class DivergedError(UserError):
    """Some models' loss became NaN/inf and --drop-diverged was not given."""


def build_spec(config: Config, dataset: Dataset, steps_per_epoch: int,
               conv_impl: str | None = None) -> StepSpec:
    """The step's model, optimiser and augmentation; conv_impl (default: the training
    lowering of config.conv_impl) changes only how convolutions are computed."""
    conv_impl = conv_impl or lowering.resolve(config.conv_impl, config.ensemble)[0]
    model = models.create(config.arch, dataset.num_classes, conv_impl=conv_impl,
                          dtype=config.dtype)
    flip = dataset.flip if config.flip is None else config.flip
    translate = dataset.translate if config.translate is None else config.translate
    return StepSpec(model, make_optimizer(config, steps_per_epoch), dataset.num_classes,
                    dataset.mean, dataset.std, flip, translate, config.label_smoothing)


class Trainer:
    """Trains waves of models of one run on one mesh; data is put on the devices once."""

    def __init__(self, config: Config, dataset: Dataset, devices=None):
        self.config, self.dataset = config, dataset
        self.steps = steps_per_epoch(dataset.num_train, config.subset_ratio, config.batch_size)
        _, strategy = lowering.resolve(config.conv_impl, config.ensemble)
        eval_conv, eval_strategy, self.eval_batch_size = lowering.resolve_eval(
            config.conv_impl, config.ensemble, config.eval_batch_size)
        self.mesh = make_mesh(devices)
        self.ensemble = Ensemble(build_spec(config, dataset, self.steps), dataset.image_shape,
                                 config.batch_size, self.mesh, strategy,
                                 build_spec(config, dataset, self.steps, eval_conv),
                                 eval_strategy)
        put = lambda a: jax.device_put(a, self.ensemble.replicated)  # noqa: E731
        self.x_train, self.y_train = put(dataset.x_train), put(dataset.y_train)
        self.x_test, self.y_test = put(dataset.x_test), put(dataset.y_test)
        self.eval_epochs = config.eval_epochs()
        self.plan = None  # called once with the seconds per step measured after compiling

    def empty_wave(self, count: int) -> dict[str, np.ndarray]:
        e, epochs = len(self.eval_epochs), self.config.epochs
        return {"correct_train": np.zeros((e, count, self.dataset.num_train), bool),
                "correct_test": np.zeros((e, count, self.dataset.num_test), bool),
                "train_loss": np.zeros((epochs, count)),
                "train_batch_acc": np.zeros((epochs, count)),
                "epochs_done": np.int64(0), **{f"{part}_seconds": np.float64(0)
                                               for part in TIMED_PARTS}}

    def train_wave(self, wave: int, indices: np.ndarray, masks: np.ndarray, padded: int,
                   bar, work: WorkDir | None) -> dict[str, np.ndarray]:
        """Train the models `indices` (masks [m, N]) as one wave padded to `padded` models
        (padding repeats the last model; its results are dropped). Returns the wave's arrays."""
        config, ensemble = self.config, self.ensemble
        reset_peak_memory()
        rows = np.minimum(np.arange(padded), len(indices) - 1)
        wave_indices = indices[rows]
        # [padded, N] on the devices of their models: the source of every epoch's orders
        wave_masks = jax.device_put(masks[rows], ensemble.model_sharding)
        init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, wave_indices))
        states = ensemble.init(jax.device_put(init_keys, ensemble.model_sharding))
        if config.init_from:
            states = self._load_pretrained(states)
        result = self.empty_wave(len(indices))
        restored = work.restore_epoch(wave, states, result) if work else None
        if restored is not None:
            epochs_done, states, result = restored
            bar.update(int(epochs_done) * self.steps)
        aug_base = keys.model_keys(config.seed, keys.AUGMENT, wave_indices)
        saved = time.perf_counter()
        for epoch in range(int(result["epochs_done"]), config.epochs):
            states = self._train_epoch(states, epoch, wave_indices, wave_masks, aug_base,
                                       result, bar)
            self._check_finite(epoch, indices, result, work)
            if epoch + 1 in self.eval_epochs:
                orders = model_orders(config.seed, wave_indices, wave_masks, epoch, self.steps,
                                      config.batch_size, ensemble.model_sharding)
                self._evaluate(states, orders, self.eval_epochs.index(epoch + 1), result, masks)
            result["epochs_done"] = np.int64(epoch + 1)
            if work and epoch + 1 < config.epochs and (
                    time.perf_counter() - saved >= config.checkpoint_seconds):
                tic = time.perf_counter()
                work.save_epoch(wave, epoch + 1, states, result)
                saved = time.perf_counter()
                result["checkpoint_seconds"] += saved - tic
            losses = result["train_loss"][epoch]
            loss = np.nanmean(losses) if np.isfinite(losses).any() else np.nan
            bar.set_postfix(wave=wave + 1, epoch=epoch + 1, loss=f"{loss:.3f}",
                            acc=f"{result['train_batch_acc'][epoch].mean():.3f}")
        result["peak_memory_bytes"] = np.int64(peak_memory(self.mesh.devices.flat) or -1)
        return result

    def _train_epoch(self, states, epoch: int, wave_indices, wave_masks, aug_base, result, bar):
        """One epoch of every model of the wave; writes its losses and batch accuracies."""
        config, ensemble = self.config, self.ensemble
        tic = time.perf_counter()
        aug_keys = jax.device_put(jax.random.key_data(jax.vmap(
            lambda k: jax.random.fold_in(k, epoch))(aug_base)), ensemble.model_sharding)
        orders = model_orders(config.seed, wave_indices, wave_masks, epoch, self.steps,
                              config.batch_size, ensemble.model_sharding)
        totals = ensemble.zero_totals(len(wave_indices))
        in_flight = collections.deque()
        timed = min(PLAN_WARMUP_STEPS, self.steps - 1)  # steps after the compiling one
        first = not result["compile_seconds"]  # this wave's step is not compiled yet
        for step in range(self.steps):
            states, totals = ensemble.train_step(states, totals, orders, aug_keys,
                                                 self.x_train, self.y_train, step)
            if first and step == 0:
                jax.block_until_ready(totals)
                warm = time.perf_counter()
                result["compile_seconds"] += warm - tic
            if self.plan is not None and first and step == timed > 0:
                jax.block_until_ready(totals)
                self.plan((time.perf_counter() - warm) / timed)
                self.plan = None
            # Wait on the totals of two steps back: the bar shows real progress without a
            # sync every step.
            in_flight.append(totals)
            if len(in_flight) > 2:
                jax.block_until_ready(in_flight.popleft())
            bar.update(1)
        real = result["train_loss"].shape[1]
        totals = jax.tree.map(lambda t: np.asarray(t)[:real], totals)
        result["train_seconds"] += time.perf_counter() - (warm if first else tic)
        examples = np.maximum(totals.examples, 1.0)
        result["train_loss"][epoch] = totals.loss_sum / examples
        result["train_batch_acc"][epoch] = totals.correct / examples
        return states

    def _check_finite(self, epoch: int, indices, result, work: WorkDir | None) -> None:
        bad = ~np.isfinite(result["train_loss"][epoch])
        if bad.any() and not self.config.drop_diverged:
            where = f"; the checkpoints in {work.path} are intact" if work else ""
            raise DivergedError(
                f"models {', '.join(map(str, indices[bad]))} diverged (loss NaN/inf) in "
                f"epoch {epoch + 1}{where}; lower --lr, or pass --drop-diverged to "
                "exclude them from the scores")

    def _evaluate(self, states, orders, position: int, result, masks) -> None:
        """Correctness of every model on every training and test example (eval mode), with
        --recalibrate-bn after recomputing each model's BatchNorm statistics on its own subset
        (the examples of its epoch order, orders [M, S*B]). At the last evaluated epoch (the
        last epoch, so divergence is known) also the wave's held-out prediction sums over its
        included models (masks [m, N]): `heldout_prob_sum`, `heldout_votes` [N, C]."""
        tic = time.perf_counter()
        if self.config.recalibrate_bn and jax.tree.leaves(states.batch_stats):
            states = self.ensemble.recalibrate(states, orders, self.x_train, self.y_train)
        real, size = result["train_loss"].shape[1], self.eval_batch_size
        collect = None
        if position == len(self.eval_epochs) - 1:
            held = ~masks & ~diverged_models(result["train_loss"])[:, None]  # [m, N]
            sums = HeldoutSums.zeros(self.dataset.num_train, self.dataset.num_classes)
            collect = lambda start, predicted, probs: sums.add(  # noqa: E731
                start, predicted[:real], probs[:real], held[:, start:start + probs.shape[1]])
        result["correct_train"][position] = self.ensemble.correct_on(
            states, self.x_train, self.y_train, size, collect)[:real]
        if collect is not None:
            result.update(sums.arrays())
        result["correct_test"][position] = self.ensemble.correct_on(
            states, self.x_test, self.y_test, size)[:real]
        result["eval_seconds"] += time.perf_counter() - tic

    def _load_pretrained(self, states):
        from jaxmem.models.pretrained import load_timm_vit

        params = load_timm_vit(self.config.init_from, jax.device_get(states.params),
                               self.config.arch)
        return states._replace(params=jax.device_put(params, self.ensemble.model_sharding))


def train_ensemble(config: Config, dataset: Dataset, masks: np.ndarray, devices=None,
                   progress: bool = True, work: WorkDir | None = None,
                   prior: Run | None = None) -> EnsembleResult:
    """Train the models config.model_indices(), whose subsets are the rows of masks [K, N].

    With config.until_se, waves stop as soon as every example's standard error is below it,
    counting the models of `prior` (a finished run these models are added to) too.
    """
    indices = np.asarray(config.model_indices())
    if masks.shape != (len(indices), dataset.num_train):
        raise ValueError(f"masks {masks.shape} do not match {len(indices)} models x "
                         f"{dataset.num_train} examples")
    trainer = Trainer(config, dataset, devices)
    per_wave = config.models_per_wave or auto_wave_size(trainer, len(indices))
    waves = wave_slices(len(indices), per_wave, trainer.ensemble.num_devices)
    bar = tqdm(total=len(waves) * config.epochs * trainer.steps, unit="step",
               disable=not progress, dynamic_ncols=True)
    trainer.plan = lambda seconds: bar.write(plan_line(config, trainer, waves, seconds))
    done = []
    before = [] if prior is None else [{
        "masks": np.asarray(prior.masks), "correct_train": prior.correct_train[None],
        "train_loss": prior.train_loss}]
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
        arrays["masks"] = masks[start:stop]
        if config.until_se is not None and below_target_se(before + done, config):
            bar.write(f"every standard error is below {config.until_se} after "
                      f"{sum(len(w['masks']) for w in before) + stop} models")
            break
    bar.close()
    used = sum(a["train_loss"].shape[1] for a in done)
    stacked = {name: np.concatenate([a[name] for a in done], axis=1) for name in WAVE_ARRAYS}
    return EnsembleResult(
        indices[:used], masks[:used], trainer.eval_epochs, stacked["correct_train"],
        stacked["correct_test"], stacked["train_loss"], stacked["train_batch_acc"],
        {part: float(sum(a[f"{part}_seconds"] for a in done)) for part in TIMED_PARTS},
        [str(d) for d in trainer.mesh.devices.flat],
        [int(a["peak_memory_bytes"]) if a["peak_memory_bytes"] >= 0 else None for a in done],
        combine(done))


def plan_line(config: Config, trainer: Trainer, waves: list, seconds_per_step: float) -> str:
    """The run's plan and its projected training time from a measured step."""
    steps = len(waves) * config.epochs * trainer.steps
    seconds = steps * seconds_per_step
    projected = (f"{seconds / 3600:.1f} h" if seconds >= 3600 else
                 f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
    size = max(stop - start for start, stop, _ in waves)
    return (f"plan: {sum(stop - start for start, stop, _ in waves)} models in {len(waves)} "
            f"wave(s) of up to {size} on {trainer.mesh.size} device(s); {config.epochs} epochs "
            f"x {trainer.steps} steps of {config.batch_size} per model, evaluated at "
            f"{len(trainer.eval_epochs)} epochs; {seconds_per_step:.3f} s per step after "
            f"compiling -> about {projected} of training")


def below_target_se(waves: list[dict], config: Config) -> bool:
    """Is the largest per-example standard error (last evaluated epoch) of the models of
    `waves` (each with masks [m, N], correct_train [E, m, N], train_loss [epochs, m]) below
    --until-se? Excluded (diverged) models do not count."""
    masks = np.concatenate([w["masks"] for w in waves])
    correct = np.concatenate([w["correct_train"][-1] for w in waves])
    losses = np.concatenate([w["train_loss"] for w in waves], axis=1)
    keep = ~diverged_models(losses)
    scores = estimator.memorization_scores(masks[keep], correct[keep], config.min_count)
    return not scores["low_count"].any() and np.nanmax(scores["memorization_se"]) < config.until_se
