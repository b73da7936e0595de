"""Static-range (calibrated) activation quantization: a fixed ``[lo, hi]`` instead of run-time min/max.

Phones run static quantization only (the paper calibrates 100 samples and fixes each layer's input
range at mean +/- 3 std). The range's codes are those of :func:`fraqat_jax.quant.fake.range_codes`
(asymmetric, ``scale = (hi - lo) / (2**bits - 1)``, ``zero = lo``).

Gradient of :func:`static_fake_quant`: straight-through inside ``[lo, hi]``, zero outside (a clipped
value does not move with its input); the range itself gets no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fraqat_jax.quant.fake import range_codes

__all__ = ["grid_codes", "nudge_range", "static_codes", "static_fake_quant", "zero_point"]


def static_codes(x, lo, hi, bits):
    """Asymmetric codes of ``x`` on the fixed range ``[lo, hi]`` at ``bits`` (a Python number).

    Returns float32 ``(codes, scale, zero)`` with ``codes`` in [0, floor(2**bits) - 1],
    ``scale = (hi - lo) / (2**bits - 1)`` and ``zero = lo``; ``codes * scale + zero`` is the value.
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    return range_codes(x.astype(jnp.float32), lo, hi, jnp.float32(bits))


def grid_codes(x, lo, hi, bits):
    """Codes of ``x`` on the integer grid of the static range ``[lo, hi]``, in a fixed arithmetic that
    an exported graph can repeat bit for bit: ``scale`` as :func:`static_codes` gives it, its
    reciprocal ``inv = 1 / scale`` (one rounding), the integer ``zero_point = clip(round(-lo * inv),
    0, 2**bits - 1)`` and ``codes = clip(round(x * inv) + zero_point, 0, 2**bits - 1)`` (round half to
    even); the value is ``(codes - zero_point) * scale``.

    On a nudged range (:func:`nudge_range`: ``lo = -zero_point * scale``) these are
    :func:`static_codes`' codes in exact arithmetic; in float32 the formulas round differently for
    inputs within an ulp or so of a rounding boundary, and there a code moves by one step. Why the
    reciprocal: XLA rewrites a division by a broadcast scalar into a product with its reciprocal, and
    folds divisions of divisions, so ``x / scale`` is not what it computes; the scale passes an
    optimization barrier, which keeps the algebraic simplifier from folding ``1 / scale`` into the
    scale's own arithmetic, so that it is one division of the rounded scale.
    ``fraqat_jax.export.cpu_graph`` writes the same steps. Returns float32 ``(codes, scale, zero_point)``.
    """
    _, scale, _ = static_codes(jnp.zeros((), jnp.float32), lo, hi, bits)
    inv = 1.0 / jax.lax.optimization_barrier(scale)
    top = jnp.floor(jnp.exp2(jnp.float32(bits))) - 1.0
    zero = jnp.clip(jnp.round(-jnp.asarray(lo, jnp.float32) * inv), 0.0, top)
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) * inv) + zero, 0.0, top)
    return codes, scale, zero


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def static_fake_quant(x, lo, hi, bits):
    """``x`` quantized on ``[lo, hi]`` at ``bits`` and dequantized, in ``x``'s dtype."""
    codes, scale, zero = static_codes(x, lo, hi, bits)
    return (codes * scale + zero).astype(x.dtype)


def _fwd(x, lo, hi, bits):
    return static_fake_quant(x, lo, hi, bits), (x, lo, hi)


def _bwd(bits, res, g):
    x, lo, hi = res
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(lo), jnp.zeros_like(hi)


static_fake_quant.defvjp(_fwd, _bwd)


def nudge_range(lo: float, hi: float, bits: float) -> tuple[float, float]:
    """``[lo, hi]`` moved so that zero lies exactly on the grid: the zero point ``-lo / scale`` becomes
    an integer in ``[0, 2**bits - 1]``, as phone runtimes and ONNX store it (uint8 at 8 bits).

    ``scale = (hi - lo) / (2**bits - 1)`` is kept; ``zero_point = clip(round(-lo / scale), 0, 2**bits - 1)``;
    the range becomes ``[-zero_point * scale, (2**bits - 1 - zero_point) * scale]``. When ``[lo, hi]``
    contains zero both ends move by at most half a step; a range that excludes zero is shifted to
    start (or end) at zero, since a zero point outside the code range cannot be stored. Computed in
    float64 on the host (calibration time, not in a traced function).
    """
    lo, hi = float(lo), float(hi)
    levels = float(2.0**bits - 1.0)
    if not hi > lo:
        return lo, hi
    scale = (hi - lo) / levels
    zero_point = min(max(round(-lo / scale), 0), levels)
    return -zero_point * scale, (levels - zero_point) * scale


def zero_point(lo: float, hi: float, bits: float) -> int:
    """The integer zero point of a nudged range (``round(-lo / scale)``, see :func:`nudge_range`)."""
    scale = (float(hi) - float(lo)) / float(2.0**bits - 1.0)
    return int(round(-float(lo) / scale)) if scale > 0 else 0
