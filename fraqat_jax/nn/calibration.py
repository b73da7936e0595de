"""Static activation ranges: mean +/- 3 standard deviations of each layer's input (the paper's
phone calibration), nudged to an integer zero point.

Definition. For one quantized layer, let ``X`` be the set of all scalar elements of every input the
layer receives over the calibration batches (all batch, token and feature positions pooled).
``mu`` and ``sigma`` are the mean and the population standard deviation (ddof=0) of ``X``; the
static range is ``[lo, hi] = [mu - 3 sigma, mu + 3 sigma]``, stored in the layer's ``act_range``.
Per-batch means and variances are computed on the device in float32 and pooled exactly (Chan's
formula) in float64 on the host. The model runs jitted; ``jax.debug.callback`` carries the
statistics out.

During calibration each quantized layer sees weights quantized at its current bit-width and an
*unquantized* input (no ranges exist yet); the model otherwise runs as usual.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.nn.graph import quantized_layers
from fraqat_jax.nn.stats import CalibrationStats
from fraqat_jax.quant import nudge_range


def _default_forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def calibrate(model: nnx.Module, batches: Iterable[Any], *, forward: Callable | None = None,
              pattern: str | None = None, switch_to_static: bool = True) -> nnx.Module:
    """Fixes static activation ranges at mean +/- 3 std of each quantized layer's input.

    Args:
      model: a model returned by :func:`fraqat_jax.quantize_model`; changed in place and returned.
      batches: an iterable of batches, each a pytree of arrays (the paper uses 100 random samples).
        Each is passed as ``model(**batch)`` if a dict, ``model(*batch)`` if a tuple, else
        ``model(batch)``.
      forward: optional ``forward(model, batch)`` to call instead (e.g. to add timesteps).
        ``calibrate`` runs it under ``nnx.jit`` (one compilation for all batches of one shape).
      pattern: if given, only layers whose path fully matches this regular expression.

      switch_to_static: when False, layers keep their (dynamic) granularity and only record the range
        (an export of a dynamically trained model stores ranges for static runtimes this way).

    Every calibrated layer gets ``act_range = [mu - 3 sigma, mu + 3 sigma]`` (see the module
    docstring), nudged so that zero is a code (``fraqat_jax.quant.nudge_range``: an integer zero
    point, as ONNX and phone runtimes store it; each end moves by at most half a step when the range
    contains zero), and switches to ``act_ranges = "static"``. Layers with ``act_bits=None`` are
    skipped. Raises ``ValueError`` if ``batches`` is empty or a layer received no input.
    """
    forward = forward or _default_forward
    layers = [(path, layer) for path, layer in quantized_layers(model)
              if layer.act_bits is not None and (pattern is None or re.fullmatch(pattern, path))]

    @nnx.jit
    def run(model, batch):
        forward(model, batch)

    n_batches = 0
    try:
        for _, layer in layers:
            layer.calibration_stats = CalibrationStats()
        for batch in batches:
            run(model, batch)
            n_batches += 1
        jax.effects_barrier()
        stats = [(path, layer, layer.calibration_stats) for path, layer in layers]
    finally:
        for _, layer in layers:
            if hasattr(layer, "calibration_stats"):
                del layer.calibration_stats
    if n_batches == 0:
        raise ValueError("calibrate() got no batches: pass at least one")
    unseen = [path for path, _, st in stats if st.count == 0]
    if unseen:
        raise ValueError(f"calibrate(): these quantized layers received no input: {unseen}")
    for _, layer, st in stats:
        lo, hi = nudge_range(*st.range(), layer.act_bits)
        layer.act_range[...] = jnp.asarray([lo, hi], jnp.float32)
        if switch_to_static:
            layer.act_ranges = "static"
    return model
