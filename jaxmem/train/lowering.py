"""Which ensemble computation each backend gets: chosen from measurement, kept in one place.

conv_impl: how a convolution is lowered (models/layers.py); ensemble: how the model axis is
mapped (train/ensemble.py). Both compute the same numbers (tests/test_layers.py,
tests/test_ensemble.py); only speed differs. Measurements behind the table: BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

import jax

from jaxmem.errors import UserError
from jaxmem.models.layers import CONV_IMPLS
from jaxmem.train.ensemble import STRATEGIES, parse_strategy

# backend, or (backend, arch) where an architecture was measured to differ -> (conv_impl,
# ensemble strategy); `best` looks the pair up first.
# cpu: vmapped lax convs become grouped convolutions, several times slower than one model's;
# im2col under vmap runs at one model's speed per model, and unroll is no faster while it
# compiles one program copy per model, so "auto" is im2col+vmap (numbers: BENCHMARKS.md).
# gpu (H200, bfloat16, batch 512; experiments/benchmarks/gpu_bench.sh): lax convs in lax.map
# run each model at about one model's speed (resnet18 73k model-examples/s at M = 8, against
# 77k one model at a time), while under vmap they become grouped convolutions whose backward
# is slow (resnet18 42k) and slow to compile (tiny_cnn and med_vgg under vmap took over 40 s;
# under map they ran at 564k and 327k). small_vgg's narrow convs are the exception: vmap 408k
# at M = 64, map 358k, vmap in chunks of 8 372k, im2col 221k. tpu: not measured; lax convs
# under vmap are what its compiler batches.
BEST = {
    "cpu": ("im2col", "vmap"),
    "gpu": ("xla", "map"),
    ("gpu", "small_vgg"): ("xla", "vmap"),
    "tpu": ("xla", "vmap"),
}


# The same for the forward-only passes (evaluation and BatchNorm recalibration), with their
# batch, measured apart from training's (experiments/benchmarks/eval_lowerings.py,
# BENCHMARKS.md). cpu: without a backward pass lax convs win once each model runs its own
# (lax.map; under vmap they are grouped): one evaluation of the default run's 32 tiny_cnn
# models took 2.0 s against 7.7 s with training's im2col/vmap at batch 1,024, and 4 small_vgg
# models on 32x32 images 10.4-11.1 s against 17.5-21.0 s; batches 128-512 are within 10%.
# gpu (H200, batch 512): resnet18 map 300k model-examples/s, vmap 261k; small_vgg vmap 2.67M,
# map 1.72M.
EVAL_BEST = {
    "cpu": ("xla", "map", 256),
    "gpu": ("xla", "map", 512),
    ("gpu", "small_vgg"): ("xla", "vmap", 512),
    "tpu": ("xla", "vmap", 1024),
}


def best(table: dict, backend: str, arch: str | None) -> tuple:
    """The table's row for (backend, arch), else for the backend, else GPU's."""
    return table.get((backend, arch)) or table.get(backend) or table["gpu"]


def resolve(conv_impl: str, ensemble: str, backend: str | None = None,
            arch: str | None = None) -> tuple[str, str]:
    """Replace "auto" by the measured best for the backend (and architecture); check explicit
    choices."""
    backend = backend or jax.default_backend()
    best_conv, best_ensemble = best(BEST, backend, arch)
    conv_impl = best_conv if conv_impl == "auto" else conv_impl
    ensemble = best_ensemble if ensemble == "auto" else ensemble
    if conv_impl not in CONV_IMPLS:
        choices = ", ".join(CONV_IMPLS)
        raise UserError(f"unknown --conv-impl {conv_impl!r}; choose auto or {choices}")
    if parse_strategy(ensemble) is None:
        raise UserError(f"unknown --ensemble {ensemble!r}; choose auto or {', '.join(STRATEGIES)} "
                        "(C = models per chunk, >= 1)")
    return conv_impl, ensemble


def resolve_eval(conv_impl: str, ensemble: str, batch_size: int,
                 backend: str | None = None, arch: str | None = None) -> tuple[str, str, int]:
    """(conv_impl, ensemble, batch) of the forward-only passes: a --conv-impl or --ensemble
    given explicitly applies to them too, "auto" takes EVAL_BEST; batch_size 0 takes its batch."""
    backend = backend or jax.default_backend()
    best_conv, best_ensemble, best_batch = best(EVAL_BEST, backend, arch)
    conv_impl, ensemble = resolve(best_conv if conv_impl == "auto" else conv_impl,
                                  best_ensemble if ensemble == "auto" else ensemble, backend,
                                  arch)
    return conv_impl, ensemble, batch_size or best_batch


# Allocator settings for the process (glibc reads them only at start-up, hence a re-exec).
# XLA allocates every activation as a fresh buffer; glibc serves buffers above 32 MiB with mmap
# and unmaps them on free, so every step page-faults its activations in again (4 KiB pages; on
# this VM ~1 GB/s: writing a 75 MB im2col buffer took 79-148 ms instead of 9-25 ms). Keeping
# freed memory in the heap (mmap/trim thresholds) and backing it by transparent huge pages
# (hugetlb=1 = madvise) removes that cost. Measured numbers: BENCHMARKS.md.
GLIBC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:"
                  "glibc.malloc.trim_threshold=68719476736")


def process_env() -> dict[str, str]:
    """Environment variables that make this process faster (Linux/glibc; empty elsewhere)."""
    return {"GLIBC_TUNABLES": GLIBC_TUNABLES} if sys.platform.startswith("linux") else {}


def reexec_with_process_env() -> None:
    """Re-execute the current command once with process_env() set (a no-op when it is set
    already, when the user set GLIBC_TUNABLES themselves, or off Linux). Call it first thing
    in a script's main, before any heavy work."""
    wanted = process_env()
    if not wanted or all(os.environ.get(k) for k in wanted) or os.environ.get(
            "JAXMEM_NO_REEXEC"):
        return
    env = {**os.environ, **wanted, "JAXMEM_NO_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
