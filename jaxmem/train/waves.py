"""Wave planning: how many models train at once, from the compiled step's memory use and the
devices' free memory."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from jaxmem.train import step as step_lib


def padded_size(count: int, num_devices: int) -> int:
    """A wave of `count` models padded up to a multiple of the device count, so that every
    device holds the same number of models (padding repeats the last model)."""
    return math.ceil(count / num_devices) * num_devices


class WavePlan:
    """Models per wave, asked before every wave with the number of models still to train, so
    waves may change size within a run. This plan fixes the size at the first wave:
    --models-per-wave, else as many as fit the devices' free memory (`auto_wave_size`)."""

    def __init__(self, models_per_wave: int = 0):
        self.size = models_per_wave or None

    def __call__(self, trainer, remaining: int) -> int:
        if self.size is None:
            self.size = auto_wave_size(trainer, remaining)
        return min(self.size, remaining)


# Share of the free memory a wave may plan to use (the rest: fragmentation, evaluation, XLA).
MEMORY_FRACTION = 0.7
# On CPU the compiled memory analysis undercounts what the process holds (1,400 images of
# 16x16x3, batch 32: planned ~0.26 GB per model, resident peak 17.2 GiB for 48 models, ~0.36),
# so only this share of the host's available memory is offered to the plan.
HOST_MEMORY_SHARE = 0.7


def auto_wave_size(trainer, num_models: int) -> int:
    """Models per wave that fit the free memory, from the compiled train step's and evaluation's
    memory use for one model per device: device memory on GPU/TPU; on CPU, where devices report
    none, the host's available memory shared by the CPU devices."""
    free = free_memory(trainer.mesh.devices.flat)
    count = trainer.mesh.size
    per_model = max(compiled_bytes(trainer, count), 1)
    per_device = max(1, int(MEMORY_FRACTION * free // per_model))
    return min(num_models, per_device * count)


def compiled_bytes(trainer, count: int) -> int:
    """Bytes one device needs for one model: the larger of the compiled train step and the
    compiled evaluation (arguments + outputs - aliased + temporaries), with `count` models on
    `count` devices."""
    ensemble = trainer.ensemble
    sharded = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=ensemble.model_sharding)
    keys_shape = sharded((count, 2), jnp.uint32)
    states = jax.eval_shape(ensemble.init, keys_shape)
    totals = step_lib.StepTotals(*[sharded((count,), jnp.float32)] * 3)
    train = ensemble.train_step.lower(
        states, totals, sharded((count, trainer.steps * trainer.config.batch_size), jnp.int32),
        keys_shape, trainer.x_train, trainer.y_train, 0).compile()
    ids = jax.ShapeDtypeStruct((trainer.eval_batch_size,), jnp.int32)
    evaluate = ensemble.evaluate.lower(states, trainer.x_train, trainer.y_train, ids).compile()
    return max(_bytes(train.memory_analysis()), _bytes(evaluate.memory_analysis()))


def _bytes(usage) -> int:
    return (usage.argument_size_in_bytes + usage.output_size_in_bytes
            - usage.alias_size_in_bytes + usage.temp_size_in_bytes)


def free_memory(devices) -> int:
    """Smallest free memory of one device in bytes: reported device memory (GPU, TPU), else
    HOST_MEMORY_SHARE of the host's available memory split evenly over the devices (CPU devices
    share it)."""
    devices = list(devices)
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return int(HOST_MEMORY_SHARE * host_available_memory()) // len(devices)


def host_available_memory() -> int:
    """The host's available memory in bytes (Linux MemAvailable: free plus reclaimable cache),
    or, where /proc/meminfo is missing, the physical memory."""
    available = _kib_field("/proc/meminfo", "MemAvailable:")
    if available is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available


def _kib_field(path: str, name: str) -> int | None:
    """The bytes of a 'Name:  123 kB' line of a /proc file, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> None:
    """Start a new peak-resident-memory window for `peak_memory` on CPU (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM); device peaks (GPU, TPU) are not resettable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(devices) -> int | None:
    """Largest peak bytes in use over the devices where the backend reports it (GPU, TPU), else
    the process's peak resident memory since `reset_peak_memory` (VmHWM; None if unknown)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        return max(peaks)
    return _kib_field("/proc/self/status", "VmHWM:")
