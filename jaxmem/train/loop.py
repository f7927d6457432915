"""The epoch loop: waves of models, epochs of per-model batches, evaluation at chosen epochs.

Returns everything the estimator needs (masks and correctness), not only the scores. With a
`WorkDir` every finished wave and the wave in progress are saved, so a killed run resumes
where it stopped and gives the same results.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem import keys, margins, models
from jaxmem.config import Config
from jaxmem.data import Dataset
from jaxmem.errors import UserError
from jaxmem.rundir import EnsembleResult, Run, diverged_models
from jaxmem.rundir.heldout import HeldoutSums
from jaxmem.rundir.record import TIMED_PARTS
from jaxmem.train import lowering
from jaxmem.train.checkpoint import Checkpoint, WorkDir
from jaxmem.train.ensemble import Ensemble, make_mesh
from jaxmem.train.finished import FinishedModels
from jaxmem.train.optim import make_optimizer, schedule_for
from jaxmem.train.orders import model_orders, steps_per_epoch
from jaxmem.train.plan import RunPlan, plan_run
from jaxmem.train.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from jaxmem.train.progress import Progress
from jaxmem.train.step import StepSpec, StepTotals
from jaxmem.train.waves import WavePeaks, WavePlan, padded_size

# Steps timed after the first (which compiles) for the plan's projected time.
PLAN_WARMUP_STEPS = 3
# Per-model arrays of a wave in progress (model axis second for [E, m, ...] / [epochs, m]);
# a finished wave keeps only the last evaluation's margins ([m, N]) and their sums.
WAVE_ARRAYS = ("correct_train", "correct_test", "margins", "train_loss", "train_batch_acc")


class DivergedError(UserError):
    """Some models' loss became NaN/inf and --drop-diverged was not given."""


def build_spec(config: Config, dataset: Dataset, conv_impl: str | None = None) -> StepSpec:
    """The step's model, optimiser and augmentation (the learning rate's schedule is an
    argument of the step: `Trainer.schedule`); conv_impl (default: the training lowering of
    config.conv_impl) changes only how convolutions are computed."""
    conv_impl = conv_impl or lowering.resolve(config.conv_impl, config.ensemble,
                                              arch=config.arch)[0]
    model = models.create(config.arch, dataset.num_classes, conv_impl=conv_impl,
                          dtype=config.dtype)
    flip = dataset.flip if config.flip is None else config.flip
    translate = dataset.translate if config.translate is None else config.translate
    return StepSpec(model, functools.partial(make_optimizer, config), dataset.num_classes,
                    dataset.mean, dataset.std, flip, translate, config.label_smoothing)


class Trainer:
    """Trains waves of models of one run on one mesh; data is put on the devices once."""

    def __init__(self, config: Config, dataset: Dataset, devices=None):
        self.config, self.dataset = config, dataset
        self.steps = steps_per_epoch(dataset.num_train, config.subset_ratio, config.batch_size)
        _, strategy = lowering.resolve(config.conv_impl, config.ensemble, arch=config.arch)
        eval_conv, eval_strategy, self.eval_batch_size = lowering.resolve_eval(
            config.conv_impl, config.ensemble, config.eval_batch_size, arch=config.arch)
        self.mesh = make_mesh(devices)
        self.ensemble = Ensemble(build_spec(config, dataset), dataset.image_shape,
                                 config.batch_size, self.mesh, strategy,
                                 build_spec(config, dataset, eval_conv),
                                 eval_strategy)
        put = lambda a: jax.device_put(a, self.ensemble.replicated)  # noqa: E731
        self.x_train, self.y_train = put(dataset.x_train), put(dataset.y_train)
        self.x_test, self.y_test = put(dataset.x_test), put(dataset.y_test)
        self.schedule = put(schedule_for(config, self.steps))  # on the devices once, too
        self.eval_epochs = config.eval_epochs()
        # called once with the seconds per step measured after compiling and the seconds
        # of one evaluation projected from a timed part of it (`_time_evaluation`)
        self.plan = None
        self._plan_clock = None  # (start, steps timed) while timing steps for the plan
        self.peaks = WavePeaks(self.mesh.devices.flat)

    def empty_wave(self, count: int) -> dict[str, np.ndarray]:
        e, epochs = len(self.eval_epochs), self.config.epochs
        return {"correct_train": np.zeros((e, count, self.dataset.num_train), bool),
                "correct_test": np.zeros((e, count, self.dataset.num_test), bool),
                "margins": np.zeros((e, count, self.dataset.num_train), np.int16),
                "train_loss": np.zeros((epochs, count)),
                "train_batch_acc": np.zeros((epochs, count)),
                **{f"{part}_seconds": np.float64(0) for part in TIMED_PARTS}}

    def train_wave(self, indices: np.ndarray, masks: np.ndarray, progress: Progress,
                   stop: StopSignals, work: WorkDir | None = None,
                   checkpoint: Checkpoint | None = None) -> dict[str, np.ndarray]:
        """Train the models `indices` (consecutive model indices, masks [m, N]) as one wave,
        padded to a multiple of the device count (padding repeats the last model; its results
        are dropped), continuing `checkpoint` (which holds them all) if given. Returns the
        wave's arrays, its correctness bit-packed. On a stop signal the wave is checkpointed at
        the step it reached and `Preempted` is raised."""
        config, ensemble = self.config, self.ensemble
        self.peaks.start()
        rows = np.minimum(np.arange(padded_size(len(indices), ensemble.num_devices)),
                          len(indices) - 1)
        wave_indices = indices[rows]
        # [padded, N] on the devices of their models: the source of every epoch's orders
        wave_masks = jax.device_put(masks[rows], ensemble.model_sharding)
        if checkpoint is None:
            init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, wave_indices))
            states = ensemble.init(jax.device_put(init_keys, ensemble.model_sharding))
            if config.init_from:
                states = self._load_pretrained(states)
            totals, result, position = ensemble.zero_totals(len(rows)), self.empty_wave(
                len(indices)), 0
        else:
            states, totals, result = self._restore(work, checkpoint, indices, rows)
            position = checkpoint.position
        progress.update(position)
        models = range(int(indices[0]), int(indices[-1]) + 1)
        aug_base = keys.model_keys(config.seed, keys.AUGMENT, wave_indices)
        saved, compiling = time.perf_counter(), True
        epoch, first_step = divmod(position, self.steps)
        while epoch < config.epochs:
            states, totals, step = self._train_epoch(states, totals, epoch, first_step,
                                                     wave_indices, wave_masks, aug_base,
                                                     result, progress, stop, compiling)
            compiling = False
            if step < self.steps:  # stopped inside the epoch
                self._checkpoint(work, models, epoch * self.steps + step, states, totals,
                                 result)
                raise Preempted(stopped(stop, work, f"models {models.start}..{models.stop - 1} "
                                        f"checkpointed at epoch {epoch + 1}, step {step} of "
                                        f"{self.steps}"))
            self._check_finite(epoch, indices, result, work)
            if epoch + 1 in self.eval_epochs:
                orders = model_orders(config.seed, wave_indices, wave_masks, epoch, self.steps,
                                      config.batch_size, ensemble.model_sharding)
                self._evaluate(states, orders, self.eval_epochs.index(epoch + 1), result,
                               masks)
            losses = result["train_loss"][epoch]
            loss = np.nanmean(losses) if np.isfinite(losses).any() else np.nan
            progress.set_postfix(models=f"{models.start}..{models.stop - 1}", epoch=epoch + 1,
                                 loss=f"{loss:.3f}",
                                 acc=f"{result['train_batch_acc'][epoch].mean():.3f}")
            epoch, first_step = epoch + 1, 0
            totals = ensemble.zero_totals(len(rows))
            if epoch == config.epochs:
                break
            if work and (stop.poll() or
                         time.perf_counter() - saved >= config.checkpoint_seconds):
                saved = self._checkpoint(work, models, epoch * self.steps, states, totals,
                                         result)
            if stop.stopping:
                raise Preempted(stopped(stop, work, f"models {models.start}..{models.stop - 1} "
                                        f"checkpointed after epoch {epoch}"))
        result["peak_memory_bytes"] = np.int64(self.peaks.wave_peak() or -1)
        included = ~diverged_models(result["train_loss"])  # known once the wave is trained
        result["margin_sums"] = margins.MarginSums.of(result["margins"], masks, included).sums
        result["margins"] = result["margins"][-1]
        for name in ("correct_train", "correct_test"):  # finished: kept bit-packed
            result[name] = np.packbits(result[name], axis=-1)
        return result

    def _checkpoint(self, work: WorkDir | None, models: range, position: int, states, totals,
                    result) -> float:
        """Save the wave in progress (its real models' rows, from host memory, so that it
        restores on any layout) after `position` steps; returns the time it finished."""
        if work is None:
            raise ValueError("a stop signal was handled without a work directory")
        tic = time.perf_counter()
        real = len(models)
        host = lambda tree: jax.tree.map(lambda a: np.asarray(a)[:real], jax.device_get(tree))  # noqa: E731
        partial = {**result, **{f"totals_{name}": value for name, value in
                                host(totals)._asdict().items()}}
        work.save_checkpoint(models, position, host(states), partial)
        done = time.perf_counter()
        result["checkpoint_seconds"] += done - tic
        return done

    def _restore(self, work: WorkDir, checkpoint: Checkpoint, indices: np.ndarray, rows):
        """(states, totals, partial results) of the models `indices` (all held by
        `checkpoint`) laid out as this wave's rows; the checkpoint's seconds are shared out
        by model."""
        shapes = jax.eval_shape(self.ensemble.init, jax.ShapeDtypeStruct(
            (self.ensemble.num_devices, 2), jnp.uint32))
        totals_names = [f"totals_{name}" for name in StepTotals._fields]
        states, partial = work.restore_checkpoint(
            checkpoint, shapes, [*WAVE_ARRAYS, *totals_names,
                                 *(f"{part}_seconds" for part in TIMED_PARTS)])
        picked = indices - checkpoint.models.start  # rows of the checkpoint
        put = lambda a: jax.device_put(a[picked[rows]], self.ensemble.model_sharding)  # noqa: E731
        totals = StepTotals(*(put(partial[name]) for name in totals_names))
        result = {name: partial[name][:, picked] for name in WAVE_ARRAYS}
        share = len(indices) / len(checkpoint.models)
        result.update({f"{part}_seconds": partial[f"{part}_seconds"] * share
                       for part in TIMED_PARTS})
        return jax.tree.map(put, states), totals, result

    def _train_epoch(self, states, totals, epoch: int, first_step: int, wave_indices,
                     wave_masks, aug_base, result, progress, stop, compiling: bool):
        """Steps first_step.. of one epoch of every model of the wave; at its end writes its
        losses and batch accuracies. Returns (states, totals, the step reached): below
        self.steps where a stop signal ended the epoch early."""
        config, ensemble = self.config, self.ensemble
        tic = time.perf_counter()
        aug_keys = jax.device_put(jax.random.key_data(jax.vmap(
            lambda k: jax.random.fold_in(k, epoch))(aug_base)), ensemble.model_sharding)
        orders = model_orders(config.seed, wave_indices, wave_masks, epoch, self.steps,
                              config.batch_size, ensemble.model_sharding)
        in_flight = collections.deque()
        warm = tic
        self._plan_clock = None  # plan timing stays within one epoch
        for step in range(first_step, self.steps):
            states, totals = ensemble.train_step(states, totals, orders, aug_keys,
                                                 self.x_train, self.y_train, step, self.schedule)
            if compiling and step == first_step:  # this wave's first step compiles
                jax.block_until_ready(totals)
                warm = time.perf_counter()
                result["compile_seconds"] += warm - tic
            warm += self._time_plan(totals, states, orders, result)  # not training's time
            # Wait on the totals of two steps back: the bar shows real progress without a
            # sync every step.
            in_flight.append(totals)
            if len(in_flight) > 2:
                jax.block_until_ready(in_flight.popleft())
            progress.update(1)
            if stop.after_step() and step + 1 < self.steps:
                result["train_seconds"] += time.perf_counter() - warm
                return states, totals, step + 1
        real = result["train_loss"].shape[1]
        finished = jax.tree.map(lambda t: np.asarray(t)[:real], totals)
        warm += self._time_plan(None, states, orders, result)
        result["train_seconds"] += time.perf_counter() - warm
        examples = np.maximum(finished.examples, 1.0)
        result["train_loss"][epoch] = finished.loss_sum / examples
        result["train_batch_acc"][epoch] = finished.correct / examples
        return states, totals, self.steps

    def _time_plan(self, totals, states, orders, result) -> float:
        """Time PLAN_WARMUP_STEPS steps after a first (compiling) one for the plan line;
        totals None: the epoch ended, use the steps timed so far. Then time part of an
        evaluation of `states` (orders: this epoch's, `_time_evaluation`); returns the seconds
        that took (0 before)."""
        if self.plan is None:
            return 0.0
        if self._plan_clock is None:
            if totals is not None:
                jax.block_until_ready(totals)
                self._plan_clock = (time.perf_counter(), 0)
            return 0.0
        start, count = self._plan_clock
        count += totals is not None
        if not (count and (count == PLAN_WARMUP_STEPS or totals is None)):
            self._plan_clock = (start, count)
            return 0.0
        if totals is not None:
            jax.block_until_ready(totals)
        step_seconds = (time.perf_counter() - start) / count
        tic = time.perf_counter()
        self.plan(step_seconds, self._time_evaluation(states, orders))
        self.plan = None
        spent = time.perf_counter() - tic
        result["eval_seconds"] += spent
        return spent

    def _time_evaluation(self, states, orders) -> float:
        """The projected seconds of one evaluation of this wave: a recalibration (with
        --recalibrate-bn) and one chunk of the evaluation, timed on `states` (orders [M, S*B]:
        an epoch's), the chunk's time counted once per chunk of both splits. Both are compiled
        first, as the first evaluation would (and then reuses)."""
        ensemble, size = self.ensemble, self.eval_batch_size
        timed = []
        if self.config.recalibrate_bn and jax.tree.leaves(states.batch_stats):
            timed.append((ensemble.recalibrate, (states, orders, self.x_train, self.y_train), 1))
        chunks = math.ceil(self.dataset.num_train / size) + math.ceil(self.dataset.num_test / size)
        timed.append((ensemble.evaluate_margins, (states, self.x_train, self.y_train,
                                                  jnp.arange(size, dtype=jnp.int32)), chunks))
        seconds = 0.0
        for function, args, times in timed:
            compiled = function.lower(*args).compile()
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            seconds += times * (time.perf_counter() - start)
        return seconds

    def _check_finite(self, epoch: int, indices, result, work: WorkDir | None) -> None:
        bad = ~np.isfinite(result["train_loss"][epoch])
        if bad.any() and not self.config.drop_diverged:
            where = f"; the checkpoints in {work.path} are intact" if work else ""
            raise DivergedError(
                f"models {', '.join(map(str, indices[bad]))} diverged (loss NaN/inf) in "
                f"epoch {epoch + 1}{where}; lower --lr, or pass --drop-diverged to "
                "exclude them from the scores")

    def _evaluate(self, states, orders, position: int, result, masks) -> None:
        """Correctness and margins of every model on every training and test example (eval
        mode), with --recalibrate-bn after recomputing each model's BatchNorm statistics on its
        own subset (the examples of its epoch order, orders [M, S*B]). At the last evaluated
        epoch (the last epoch, so divergence is known) also the wave's held-out prediction sums
        over its included models (masks [m, N]): `heldout_prob_sum`, `heldout_votes` [N, C];
        only then are classes and probabilities computed (the per-epoch curves need neither)."""
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
        correct, units = self.ensemble.predict_on(states, self.x_train, self.y_train, size,
                                                  collect)
        result["correct_train"][position], result["margins"][position] = correct[:real], \
            units[:real]
        if collect is not None:
            result.update(sums.arrays())
        result["correct_test"][position] = self.ensemble.predict_on(
            states, self.x_test, self.y_test, size)[0][:real]
        result["eval_seconds"] += time.perf_counter() - tic

    def _load_pretrained(self, states):
        from jaxmem.models.pretrained import load_timm_vit

        params = load_timm_vit(self.config.init_from, jax.device_get(states.params),
                               self.config.arch)
        return states._replace(params=jax.device_put(params, self.ensemble.model_sharding))


def stopped(stop: StopSignals, work: WorkDir | None, what: str) -> str:
    """The one line printed when a stop signal ended training."""
    where = f" in {work.path}" if work else ""
    return (f"{stop.received or 'stop signal'} received: {what}{where}; rerun the same command "
            f"with --resume to continue (exit status {EXIT_PREEMPTED})")


def train_ensemble(config: Config, dataset: Dataset, masks: np.ndarray, devices=None,
                   progress: bool = True, work: WorkDir | None = None,
                   prior: Run | None = None, canary_index=(), out: str | None = None
                   ) -> EnsembleResult:
    """Train the models config.model_indices(), whose subsets are the rows of masks [K, N].

    Models finished in `work` are reused by model index and a checkpoint of a wave in
    progress is continued at the step it reached, whatever the wave layout now; only the
    remaining models train. A checkpoint of more models than the wave size now allows is
    continued in chunks of that size (restored on the host): a smaller size is what a resume
    after running out of memory asks for. Before the first step the run is planned
    (train/plan.py: device, host and disk; refused when they cannot hold it) and the size of
    every wave comes from a `WavePlan`, planned again after every wave from its measured peak.
    With a work directory, SIGTERM and SIGUSR1 checkpoint the step in progress and raise
    `Preempted`. `out`: the run directory to be written (its disk is planned beside `work`).

    With config.until_se, waves stop as soon as every real example's (canaries left out)
    standard error is below it, counting the models of `prior` (a finished run these models
    are added to) too.
    """
    indices = np.asarray(config.model_indices())
    if masks.shape != (len(indices), dataset.num_train):
        raise ValueError(f"masks {masks.shape} do not match {len(indices)} models x "
                         f"{dataset.num_train} examples")
    trainer = Trainer(config, dataset, devices)
    finished = FinishedModels(indices, masks, trainer.eval_epochs, config.epochs,
                              dataset.num_test, prior)
    bar = Progress(progress)
    resume(finished, work, bar)
    sizes, run_plan = WavePlan(), None
    active = work is not None and threading.current_thread() is threading.main_thread()
    with StopSignals(active) as stop, contextlib.closing(bar):
        while finished.todo() and not reached_target(config, finished, canary_index, bar):
            if stop.stopping:
                raise Preempted(stopped(stop, work, "finished models are saved"))
            if run_plan is None:
                run_plan = plan(trainer, sizes, finished, work, out, bar)
            train_next_wave(trainer, sizes, run_plan, finished, work, bar, stop)
    record = None if run_plan is None else {**sizes.record(), **run_plan.record()}
    return finished.result(record, [str(d) for d in trainer.mesh.devices.flat])


def resume(finished: FinishedModels, work: WorkDir | None, bar: Progress) -> None:
    """Add the waves finished in `work` (one file at a time) to `finished`."""
    for arrays in work.finished() if work else ():
        finished.add(arrays)
    if finished.count:
        bar.write(f"resume: {finished.count} finished models reused")


def reached_target(config: Config, finished: FinishedModels, canary_index, bar: Progress
                   ) -> bool:
    """--until-se: is every standard error below the target now (said on the log)?"""
    if config.until_se is None or not finished.standard_errors_below(
            config.until_se, config.min_count, canary_index):
        return False
    bar.write(f"every standard error is below {config.until_se} after "
              f"{finished.count + finished.prior_models} models")
    return True


def plan(trainer: Trainer, sizes: WavePlan, finished: FinishedModels, work: WorkDir | None,
         out: str | None, bar: Progress) -> RunPlan:
    """The whole run's plan before its first step (train/plan.py), printed; refused (a
    UserError) when the host or the disk cannot hold it."""
    run_plan = plan_run(trainer, sizes, len(finished.indices), len(finished.todo()),
                        work.path if work else None, out)
    bar.write(run_plan.line())
    try:
        run_plan.check()
    except UserError:
        if work and not work.holds_work():  # refused before any work: nothing to resume
            work.remove()
        raise
    return run_plan


def train_next_wave(trainer: Trainer, sizes: WavePlan, run_plan: RunPlan,
                    finished: FinishedModels, work: WorkDir | None, bar: Progress,
                    stop: StopSignals) -> None:
    """Train the next wave of the models still to train (its size from `sizes`, a wave in
    progress in `work` continued), save it, add it to `finished` and plan the next size from
    its measured peak."""
    config, todo = trainer.config, finished.todo()
    first = not sizes.trained
    size = sizes(trainer, len(todo))
    wave, checkpoint = next_wave(todo, size, work)
    bar.expect(math.ceil(len(todo) / size) * config.epochs * trainer.steps)
    if first:  # the timed plan of this invocation, printed once a step is timed
        trainer.plan = functools.partial(write_plan, bar, config, trainer, len(todo), size)
    held = run_plan.held_since(finished.count)
    arrays = trainer.train_wave(wave, finished.masks[finished.rows_of(wave)], bar, stop, work,
                                checkpoint)
    arrays["model_indices"] = wave
    if work:
        work.save_finished(arrays)
    finished.add(arrays)
    peak = int(arrays["peak_memory_bytes"])
    replanned = sizes.finished(peak if peak >= 0 else None,
                               padded_size(len(wave), trainer.ensemble.num_devices),
                               len(finished.todo()), held)
    if replanned:
        bar.write(replanned)


def next_wave(todo: list[int], size: int, work: WorkDir | None
              ) -> tuple[np.ndarray, Checkpoint | None]:
    """The models of the next wave (up to `size` of `todo`, in order) and the checkpoint it
    continues: the one holding its first model, else none, and then the wave stops before
    models that a checkpoint holds."""
    checkpoints = work.checkpoints() if work else []
    checkpoint = resumable(checkpoints, todo)
    wave = np.asarray([k for k in todo if checkpoint is None or k in checkpoint.models][:size])
    if checkpoint is None:
        held = [k for c in checkpoints for k in c.models]
        wave = wave[:next((i for i, k in enumerate(wave) if k in held), len(wave))]
    return wave, checkpoint


def resumable(checkpoints: list[Checkpoint], todo: list[int]) -> Checkpoint | None:
    """The checkpoint to continue next: the furthest one holding the first model to train."""
    held = [c for c in checkpoints if todo[0] in c.models]
    return max(held, key=lambda c: c.position, default=None)


def write_plan(bar: Progress, *plan) -> None:
    """The plan line, then the progress bar below it."""
    bar.write(plan_line(*plan))
    bar.start()


def plan_line(config: Config, trainer: Trainer, models: int, per_wave: int,
              seconds_per_step: float, seconds_per_evaluation: float) -> str:
    """The run's plan and its projected training and evaluation time from a measured step and
    a timed part of an evaluation."""
    waves = math.ceil(models / per_wave)
    seconds = waves * config.epochs * trainer.steps * seconds_per_step
    evaluating = waves * len(trainer.eval_epochs) * seconds_per_evaluation
    share = 100 * evaluating / max(seconds + evaluating, 1e-9)
    return (f"plan: {models} models in {waves} wave(s) of up to {per_wave} on "
            f"{trainer.mesh.size} device(s); {config.epochs} epochs x {trainer.steps} steps "
            f"of {config.batch_size} per model, evaluated at {len(trainer.eval_epochs)} "
            f"epochs; {seconds_per_step:.3f} s per step after compiling -> about "
            f"{duration(seconds)} of training and {duration(evaluating)} of evaluation "
            f"({share:.0f}% of them)")


def duration(seconds: float) -> str:
    return (f"{seconds / 3600:.1f} h" if seconds >= 3600 else
            f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
