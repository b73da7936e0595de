"""Calibration statistics of one layer's inputs (a leaf: the layers record into it, ``calibrate``
reads it). See ``nn.calibration`` for the definition of the static range."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


class CalibrationStats:
    """Pooled count, mean and sum of squared deviations (float64, host) of one layer's inputs.

    While :func:`calibrate` runs, each calibrated layer holds one as its (static) attribute
    ``calibration_stats``; the layer then sends each input's float32 mean and variance here through
    ``jax.debug.callback`` (so the forward pass may be jitted) and leaves the input unquantized.
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, n: int, mean, var):
        mean, var = float(mean), float(var)
        total = self.count + n
        delta = mean - self.mean
        self.m2 += var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    def range(self) -> tuple[float, float]:
        sigma = (self.m2 / self.count) ** 0.5
        return self.mean - 3.0 * sigma, self.mean + 3.0 * sigma


def record(stats: CalibrationStats, x):
    """Sends the mean and variance of ``x`` (computed on the device) to ``stats``."""
    xf = jnp.asarray(x, jnp.float32)
    jax.debug.callback(functools.partial(stats.add, int(xf.size)), jnp.mean(xf), jnp.var(xf))
