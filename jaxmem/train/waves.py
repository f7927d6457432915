"""Wave planning: how many models train at once, from the compiled step's memory use and the
memory budget (a device's free memory, or the host's: host_memory.py), and again from the
measured peak of a finished wave (MemoryPlan.wave_size_after).

The dataset is on every device once, whatever the wave size, so it is no cost per model: the
budget is read after it was put there, and the compiled programs' sizes leave it out. On CPU
the devices are the host, whose budget also holds the run's results until its directory is
written (train/plan.py): waves get what those leave.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxmem.errors import UserError
from jaxmem.sizes import gib
from jaxmem.train import array_sizes, host_memory
from jaxmem.train import step as step_lib


def padded_size(count: int, num_devices: int) -> int:
    """A wave of `count` models padded up to a multiple of the device count, so that every
    device holds the same number of models (padding repeats the last model)."""
    return math.ceil(count / num_devices) * num_devices


class WavePlan:
    """Models per wave, asked before every wave with the number of models still to train, so
    waves may change size within a run. The first size comes from the memory plan
    (`plan_memory`: --models-per-wave, else the compiled step against the memory budget); after
    every trained wave the size is planned again from that wave's measured peak
    (`MemoryPlan.wave_size_after`), so that a plan the compiled analysis undercounted shrinks
    before it runs out of memory, and an overcautious one grows. Model k's results do not
    depend on the wave it trains in."""

    def __init__(self):
        self.memory: MemoryPlan | None = None
        self.size = 0
        # (peak bytes, padded models, results held) per wave
        self.trained: list[tuple[int | None, int, int]] = []

    def plan(self, trainer, remaining: int, reserved: int = 0, host_per_model: int = 0
             ) -> MemoryPlan:
        """The first plan (plan_memory), for `remaining` models; on CPU, `reserved` bytes of
        the host budget are the run's own and every model of a wave holds `host_per_model`
        bytes of host arrays besides its compiled programs' memory."""
        self.memory = plan_memory(trainer, remaining, reserved, host_per_model)
        self.size = self.memory.wave_size
        return self.memory

    def __call__(self, trainer, remaining: int) -> int:
        if self.memory is None:
            self.plan(trainer, remaining)
        return min(self.size, remaining)

    def finished(self, peak: int | None, padded: int, remaining: int, held: int = 0
                 ) -> str | None:
        """Record a trained wave's own peak memory (None: unknown, e.g. on a GPU a wave that
        stayed below an earlier wave's peak) and plan the next waves from it; held: bytes of
        results the host gained since the plan, before this wave (CPU: inside its peak, not
        its models' cost). Returns a line for the log when the wave size changes."""
        self.trained.append((peak, padded, held))
        measured = self.memory.measured_bytes_per_model(peak, padded, held)
        if not remaining or measured is None:  # nothing new: the size stands
            return None
        size = self.memory.wave_size_after(peak, padded, remaining, held)
        previous, self.size = min(self.size, remaining), size
        if size == previous:
            return None
        return (f"memory: a wave of {padded} models took {gib(measured)} per model -> waves of "
                f"up to {size} models")

    def record(self) -> dict | None:
        """metrics.json's account of the plan (None when no wave was trained here)."""
        if self.memory is None:
            return None
        peaks, padded, held = zip(*self.trained, strict=True) if self.trained else ((), (), ())
        return self.memory.record(list(peaks), list(padded), list(held))


# Share of the free memory a wave may plan to use from the compiled memory analysis (the rest:
# fragmentation, evaluation, XLA).
MEMORY_FRACTION = 0.7
# On CPU the compiled memory analysis undercounts what the process holds (1,400 images of
# 16x16x3, batch 32: planned ~0.26 GB per model, resident peak 17.2 GiB for 48 models, ~0.36),
# so a first plan from it counts each model's compiled bytes this many times.
HOST_RESIDENT_FACTOR = 1 / 0.7
# Share of the budget a wave may use when planned from a finished wave's measured peak (which
# counts everything the wave held; the rest absorbs the peak's variation between waves).
MEASURED_FRACTION = 0.85


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The models per wave and what they were planned from. `budget` is one device's memory:
    on GPU/TPU its free memory, on CPU the host budget (host_memory.host_budget) split over the
    CPU devices, which share one process's resident memory (`shared`). `baseline` is the memory
    in use when the budget was read (the device's bytes in use, or the process's resident
    memory), so a wave's peak minus it is what the wave's models added. `reserved`: bytes of
    each CPU device's budget the run's results take (none on GPU/TPU, whose results live on
    the host). `planned_bytes_per_model`: one model's compiled programs (the dataset left
    out; on CPU times HOST_RESIDENT_FACTOR, plus its host arrays), None where
    --models-per-wave was given. `per_device_cap`: the most models one device may hold with
    every array within the backend's element limit (array_sizes.py; None: no limit)."""

    wave_size: int
    budget: host_memory.Budget
    devices: int
    shared: bool
    baseline: int | None
    planned_bytes_per_model: int | None
    reserved: int = 0
    per_device_cap: int | None = None

    @property
    def room(self) -> int:
        """Bytes of one device's budget that waves may use."""
        return max(0, self.budget.bytes - self.reserved)

    def measured_bytes_per_model(self, peak: int | None, padded: int, held: int = 0
                                 ) -> int | None:
        """Peak bytes one model of a finished wave of `padded` models added over the baseline
        and the `held` bytes of results gained since (None where the peak or baseline is
        unknown)."""
        if peak is None or peak < 0 or self.baseline is None:
            return None
        per_pool = padded if self.shared else max(1, padded // self.devices)
        return max(1, (peak - self.baseline - held) // per_pool)

    def wave_size_after(self, peak: int | None, padded: int, remaining: int, held: int = 0
                        ) -> int:
        """Models per wave for the `remaining` models, from the measured peak of a finished wave
        of `padded` models (the plan's wave size where it is unknown or the size was given)."""
        measured = self.measured_bytes_per_model(peak, padded, held)
        if measured is None or self.planned_bytes_per_model is None:
            return min(remaining, self.wave_size)
        return fitting_models(MEASURED_FRACTION * self.room, measured, self.devices, remaining,
                              self.per_device_cap)

    @property
    def budget_bytes(self) -> int:
        """The budget of the process (CPU: all its devices) or of one device (GPU, TPU)."""
        return self.budget.bytes * (self.devices if self.shared else 1)

    def record(self, peaks: list[int | None], padded: list[int], held: list[int] | None = None
               ) -> dict:
        """metrics.json's account of the plan: budget per process, its source, the bytes
        per model planned and the largest measured over the finished waves (of `padded`
        models each, `held` bytes of results gained before each)."""
        held = held or [0] * len(peaks)
        measured = [self.measured_bytes_per_model(p, n, h)
                    for p, n, h in zip(peaks, padded, held, strict=True)]
        measured = [m for m in measured if m is not None]
        return {"budget_bytes": self.budget_bytes,
                "budget_source": self.budget.source, "budget_per": "process" if self.shared
                else "device", "models_per_wave": self.wave_size,
                "planned_bytes_per_model": self.planned_bytes_per_model,
                "models_per_device_cap": self.per_device_cap,
                "measured_peak_bytes_per_model": max(measured) if measured else None}


def plan_memory(trainer, num_models: int, reserved: int = 0, host_per_model: int = 0
                ) -> MemoryPlan:
    """The wave size of `num_models` models: --models-per-wave if given, else as many as fit
    one device's budget by the compiled train step's and evaluation's memory use (the dataset
    left out), for one model per device; on CPU first for one wave of all the models, which,
    where it fits, is the plan (the wave then runs the programs measured), and where it does
    not, a model costs the larger of its share of it and of one model alone. The wave so
    sized is compiled too (the programs it runs) and made smaller while it does not fit. On CPU
    `reserved` bytes of the host's budget are kept for the run's results, and a model costs
    HOST_RESIDENT_FACTOR times its compiled bytes (the analysis undercounts resident memory)
    plus `host_per_model` bytes of host arrays. No wave puts more models on a device than
    keep its arrays within the backend's element limit (`per_device_cap`)."""
    config, devices = trainer.config, list(trainer.mesh.devices.flat)
    count = len(devices)
    budget, shared = free_memory(devices, config.host_memory)
    baseline = memory_in_use(devices)
    kept = reserved // count if shared else 0
    cap = per_device_cap(trainer)
    plan = MemoryPlan(config.models_per_wave, budget, count, shared, baseline, None, kept, cap)
    if config.models_per_wave:
        given = padded_size(min(config.models_per_wave, num_models), count) // count
        if cap is not None and given > cap:
            raise UserError(
                f"--models-per-wave={config.models_per_wave} puts {given} models on a device, "
                f"whose arrays would exceed the {array_limit(trainer):,} elements its kernels "
                f"can index; give at most {cap * count} (or 0 to plan the waves)")
        return plan
    offered = MEMORY_FRACTION * plan.room

    def bytes_per_model(wave: int) -> int:
        per_model = max(compiled_bytes(trainer, wave) // (wave // count), 1)
        return int(HOST_RESIDENT_FACTOR * per_model) + host_per_model if shared else per_model

    whole = padded_size(num_models, count)
    if shared and whole > count:
        # CPU: a compile allocates nothing, so a wave of all the models is measured first;
        # where it fits, that wave runs the very programs measured (nothing compiled twice)
        per_model = bytes_per_model(whole)
        if fitting_models(offered, per_model, count, num_models, cap) == num_models:
            return dataclasses.replace(plan, wave_size=num_models,
                                       planned_bytes_per_model=per_model)
        # a model costs the larger of its share of that wave and of one model alone
        per_model = max(per_model, bytes_per_model(count))
    else:
        # GPU/TPU (or no more models than devices): the autotuner runs candidate kernels on
        # the device with the program's own buffers, so only a size sure to fit is compiled
        # to measure: one model per device
        per_model = bytes_per_model(count)
    size = fitting_models(offered, per_model, count, num_models, cap)
    while size > count:
        # The wave's own programs (compiling them now costs nothing: the wave runs them). A
        # model's share grows with the wave, so where they do not fit, fewer models.
        per_model = max(per_model, bytes_per_model(padded_size(size, count)))
        fitting = fitting_models(offered, per_model, count, num_models, cap)
        if fitting >= size:
            break
        size = fitting
    return dataclasses.replace(plan, wave_size=size, planned_bytes_per_model=per_model)


def fitting_models(offered: float, per_model: int, devices: int, num_models: int,
                   per_device_cap: int | None = None) -> int:
    """Models that fit `offered` bytes per device at `per_model` bytes each, on every device
    (at least one per device, at most `per_device_cap`), and no more than num_models."""
    per_device = max(1, int(offered // per_model))
    if per_device_cap is not None:
        per_device = min(per_device, per_device_cap)
    return min(num_models, per_device * devices)


def array_limit(trainer) -> int | None:
    """The most elements one array may hold on the trainer's devices (None: no limit)."""
    return array_sizes.ELEMENT_LIMIT.get(trainer.mesh.devices.flat[0].platform)


def per_device_cap(trainer) -> int | None:
    """The most models one device may hold with every array of the wave's programs within
    the backend's element limit (None where the backend has none)."""
    limit = array_limit(trainer)
    if limit is None:
        return None
    ensemble = trainer.ensemble
    sizes = array_sizes.per_model(ensemble, trainer.x_train, trainer.y_train, trainer.steps,
                                  trainer.eval_batch_size, trainer.schedule)
    return array_sizes.most_models_per_device(sizes, ensemble.strategy,
                                              ensemble.eval_strategy, limit)


def compiled_bytes(trainer, count: int) -> int:
    """Bytes one device needs for a wave of `count` models (a multiple of the device count):
    the larger of the compiled train step and the compiled evaluation (arguments + outputs -
    aliased + temporaries), less the dataset both take as arguments (on every device once,
    whatever the wave size: `dataset_bytes`)."""
    ensemble, arguments = trainer.ensemble, probe_arguments(trainer, count)
    train = ensemble.train_step.lower(*arguments).compile()
    ids = jax.ShapeDtypeStruct((trainer.eval_batch_size,), jnp.int32)
    evaluate = ensemble.evaluate.lower(arguments[0], trainer.x_train, trainer.y_train,
                                       ids).compile()
    dataset = trainer.x_train.nbytes + trainer.y_train.nbytes
    return max(_bytes(train.memory_analysis()), _bytes(evaluate.memory_analysis())) - dataset


def probe_arguments(trainer, count: int) -> tuple:
    """The train step's arguments for a wave of `count` models, as shapes laid out as a wave
    lays them out (the model axis sharded over the devices), so that the probe compiles the
    program a wave of that size runs."""
    ensemble = trainer.ensemble
    sharded = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=ensemble.model_sharding)
    keys_shape = sharded((count, 2), jnp.uint32)
    states = jax.tree.map(lambda leaf: sharded(leaf.shape, leaf.dtype),
                          jax.eval_shape(ensemble.init, keys_shape))
    totals = step_lib.StepTotals(*[sharded((count,), jnp.float32)] * 3)
    orders = sharded((count, trainer.steps * trainer.config.batch_size), jnp.int32)
    return (states, totals, orders, keys_shape, trainer.x_train, trainer.y_train, 0,
            trainer.schedule)


def dataset_bytes(trainer) -> int:
    """Bytes of the dataset on each device (training and test images and labels)."""
    return sum(a.nbytes for a in (trainer.x_train, trainer.y_train, trainer.x_test,
                                  trainer.y_test))


def _bytes(usage) -> int:
    return (usage.argument_size_in_bytes + usage.output_size_in_bytes
            - usage.alias_size_in_bytes + usage.temp_size_in_bytes)


def free_memory(devices, host_limit: str | None = None) -> tuple[host_memory.Budget, bool]:
    """(The smallest free memory of one device, whether the devices share it): reported device
    memory (GPU, TPU), else the host budget (host_memory.host_budget, with --host-memory
    `host_limit`) split evenly over the CPU devices, which share it."""
    devices = list(devices)
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return host_memory.Budget(free, "device memory (bytes_limit - bytes_in_use)"), False
    host = host_memory.host_budget(host_limit)
    return host_memory.Budget(host.bytes // len(devices), host.source), True


def memory_in_use(devices) -> int | None:
    """The largest bytes in use over the devices where the backend reports it (GPU, TPU), else
    the process's resident memory (VmRSS; None if unknown)."""
    used = [(d.memory_stats() or {}).get("bytes_in_use") for d in devices]
    used = [u for u in used if u is not None]
    if used:
        return max(used)
    return host_memory.kib_field("/proc/self/status", "VmRSS:")


def reset_peak_memory() -> None:
    """Start a new peak-resident-memory window for `peak_memory` on CPU (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM); device peaks (GPU, TPU) are not resettable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(devices) -> tuple[int | None, bool]:
    """(Largest peak bytes in use over the devices where the backend reports it (GPU, TPU),
    else the process's peak resident memory since `reset_peak_memory` (VmHWM; None if
    unknown), whether that peak was reset: False for device peaks, which last the process's
    lifetime)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        return max(peaks), False
    return host_memory.kib_field("/proc/self/status", "VmHWM:"), True


class WavePeaks:
    """Each wave's own peak memory. On CPU the resident peak is reset when a wave starts; a
    GPU's or TPU's peak is the process's highest so far, which tells a wave's own peak only
    where the wave raised it: a wave below an earlier wave's peak has an unknown peak (None),
    never the earlier wave's."""

    def __init__(self, devices):
        self.devices, self.highest = list(devices), None

    def start(self) -> None:
        reset_peak_memory()

    def wave_peak(self) -> int | None:
        peak, reset = peak_memory(self.devices)
        if peak is None or reset:
            return peak
        own = peak if self.highest is None or peak > self.highest else None
        self.highest = peak if self.highest is None else max(self.highest, peak)
        return own
