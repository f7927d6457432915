"""Which ensemble computation each backend gets: chosen from measurement, kept in one place.

conv_impl: how a convolution is lowered (models/layers.py); ensemble: how the model axis is
mapped (train/ensemble.py). Both compute the same numbers (tests/test_layers.py,
tests/test_ensemble.py); only speed differs. Measurements behind the table: BENCHMARKS.md.
"""

from __future__ import annotations

import jax

from jaxmem.errors import UserError
from jaxmem.models.layers import CONV_IMPLS
from jaxmem.train.ensemble import STRATEGIES

# backend -> (conv_impl, ensemble strategy)
BEST = {
    "cpu": ("im2col", "vmap"),
    "gpu": ("xla", "vmap"),
    "tpu": ("xla", "vmap"),
}


def resolve(conv_impl: str, ensemble: str, backend: str | None = None) -> tuple[str, str]:
    """Replace "auto" by the measured best for the backend; check explicit choices."""
    backend = backend or jax.default_backend()
    best_conv, best_ensemble = BEST.get(backend, BEST["gpu"])
    conv_impl = best_conv if conv_impl == "auto" else conv_impl
    ensemble = best_ensemble if ensemble == "auto" else ensemble
    if conv_impl not in CONV_IMPLS:
        choices = ", ".join(CONV_IMPLS)
        raise UserError(f"unknown --conv-impl {conv_impl!r}; choose auto or {choices}")
    if ensemble not in STRATEGIES:
        raise UserError(f"unknown --ensemble {ensemble!r}; choose auto or {', '.join(STRATEGIES)}")
    return conv_impl, ensemble
