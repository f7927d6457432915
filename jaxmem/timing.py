"""Steady-state timing of jitted calls, shared by the benchmark scripts in experiments/."""

from __future__ import annotations

import functools
import time

import jax


def seconds_per_call(call, seconds: float, min_calls: int = 3) -> float:
    """Seconds per call of `call()` (no arguments; JAX dispatches it asynchronously) over at
    least `min_calls` calls and `seconds`, after one warm-up call (compiles and allocates)."""
    jax.block_until_ready(call())
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        out = call()
        calls += 1
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def seconds_per_jitted_call(fn, *args, seconds: float) -> float:
    """seconds_per_call of jax.jit(fn)(*args)."""
    return seconds_per_call(functools.partial(jax.jit(fn), *args), seconds)
