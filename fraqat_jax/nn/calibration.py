"""Static activation ranges: mean +/- 3 standard deviations of each layer's input (the paper's
phone calibration).

Definition. For one quantized layer, let ``X`` be the set of all scalar elements of every input the
layer receives over the calibration batches (all batch, token and feature positions pooled).
``mu`` and ``sigma`` are the mean and the population standard deviation (ddof=0) of ``X``; the
static range is ``[lo, hi] = [mu - 3 sigma, mu + 3 sigma]``, stored in the layer's ``act_range``.
Per-batch means and variances are computed on the device in float32 and pooled exactly (Chan's
formula) in float64 on the host.

During calibration each quantized layer sees weights quantized at its current bit-width and an
*unquantized* input (no ranges exist yet); the model otherwise runs as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fraqat_calibration", default=None)


class _Stats:
    """Pooled count, mean and sum of squared deviations (float64) of one layer's inputs."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, n: int, mean: float, var: float):
        total = self.count + n
        delta = mean - self.mean
        self.m2 += var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def range(self) -> tuple[float, float]:
        sigma = (self.m2 / self.count) ** 0.5
        return self.mean - 3.0 * sigma, self.mean + 3.0 * sigma


def recording() -> bool:
    """True while :func:`calibrate` runs the model."""
    return _ACTIVE.get() is not None


def record(layer, x):
    """Adds one input ``x`` of ``layer`` to the running calibration, if one is active for it."""
    active = _ACTIVE.get()
    if active is None or id(layer) not in active:
        return
    if isinstance(x, jax.core.Tracer):
        raise RuntimeError(
            "calibrate() runs the model eagerly to read each layer's input: call the model directly "
            "in `forward`, not through jax.jit / nnx.jit"
        )
    xf = jnp.asarray(x, jnp.float32)
    mean, var = jax.device_get((jnp.mean(xf), jnp.var(xf)))
    active[id(layer)].add(int(xf.size), float(mean), float(var))


def _default_forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def _recording(stats: dict):
    token = _ACTIVE.set(stats)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def calibrate(model: nnx.Module, batches: Iterable[Any], *, forward: Callable | None = None,
              pattern: str | None = None) -> nnx.Module:
    """Fixes static activation ranges at mean +/- 3 std of each quantized layer's input.

    Args:
      model: a model returned by :func:`fraqat_jax.quantize_model`; changed in place and returned.
      batches: an iterable of batches (the paper uses 100 random samples). Each is passed as
        ``model(**batch)`` if a dict, ``model(*batch)`` if a tuple, else ``model(batch)``.
      forward: optional ``forward(model, batch)`` to call instead (e.g. to add timesteps). It must
        call the model eagerly (not under ``jax.jit``), since the inputs are read on the host.
      pattern: if given, only layers whose path fully matches this regular expression are
        calibrated.

    Every calibrated layer gets ``act_range = [mu - 3 sigma, mu + 3 sigma]`` (see the module
    docstring) and switches to ``act_granularity = "static"``. Layers with ``act_bits=None`` are
    skipped. Raises ``ValueError`` if ``batches`` is empty or a layer received no input.
    """
    from fraqat_jax.nn.rules import quantized_layers

    forward = forward or _default_forward
    layers = [(path, layer) for path, layer in quantized_layers(model)
              if layer.act_bits is not None and (pattern is None or re.fullmatch(pattern, path))]
    stats = {id(layer): _Stats() for _, layer in layers}
    n_batches = 0
    with _recording(stats):
        for batch in batches:
            forward(model, batch)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("calibrate() got no batches: pass at least one")
    unseen = [path for path, layer in layers if stats[id(layer)].count == 0]
    if unseen:
        raise ValueError(f"calibrate(): these quantized layers received no input: {unseen}")
    for _, layer in layers:
        lo, hi = stats[id(layer)].range()
        layer.act_range[...] = jnp.asarray([lo, hi], jnp.float32)
        layer.act_granularity = "static"
    return model
