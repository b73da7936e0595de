"""The fractional-bit fake quantizer (FraQAT, arXiv 2510.14823) with straight-through gradients.

A bit-width ``b`` is any real number in [2, 16]. It only enters the arithmetic through the scale
and the clipping range, so it may be a traced JAX scalar: a jitted function that takes ``bits`` as
an argument compiles once for a whole 8 -> 4 schedule.

Symmetric, narrow range (the paper's main form)::

    qmax  = 2**(b-1) - 1                          (real when b is fractional)
    scale = max|x| / qmax
    codes = clip(round(x / scale), -floor(2**(b-1)), floor(2**(b-1)) - 1)
    value = scale * codes

so INT6 uses codes [-32, 31], INT5.5 [-22, 21] (scale = max|x| / 21.63) and INT5 [-16, 15].

Asymmetric, wide range (min/max)::

    scale = (max x - min x) / (2**b - 1)
    codes = clip(round((x - min x) / scale), 0, floor(2**b) - 1)
    value = scale * codes + min x

The paper prints ``2**b`` in the denominator. We divide by ``2**b - 1`` instead: at integer ``b``
both ends of the range are then exact grid points (``max x`` maps to the top code ``2**b - 1``),
whereas with ``2**b`` the maximum always maps one step past the top code and is clipped, wasting a
level. At fractional ``b`` the top of the range maps to ``2**b - 1``, which rounds to
``floor(2**b)`` or below and the clip catches the one overflowing code, exactly as in the symmetric
form.

Granularity: ``channel_axis=None`` is one scale for the whole tensor (the paper's setting);
``channel_axis=k`` (int or tuple) keeps one scale per index along those axes, reducing over all
others; ``group_size=g`` (2-D ``x``, ``channel_axis=-1``) splits axis 0 into groups of ``g`` rows
with one scale per group and column.

Scales are computed in float32 whatever the input dtype; the result has the input's dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2.0
MAX_BITS = 16.0
MAX_ACT_BITS = 8.0  # activations run as int8 (uint8) codes

Axis = int | Sequence[int] | None


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_bits(bits, *, name: str = "bits"):
    """Validates a bit-width and returns it as a float32 JAX scalar.

    Concrete values (Python numbers, numpy or JAX scalars) must be finite and in [2, 16]; a bad one
    raises ``ValueError`` naming it. A traced value cannot be inspected: it is clipped to [2, 16]
    inside the computation instead (a NaN stays NaN and makes the output NaN).
    """
    if isinstance(bits, bool):
        raise ValueError(f"{name} must be a real number in [{MIN_BITS:g}, {MAX_BITS:g}], got bool {bits!r}")
    if _is_traced(bits):
        if jnp.ndim(bits) != 0:
            raise ValueError(f"{name} must be a scalar, got a traced array of shape {jnp.shape(bits)}")
        return jnp.clip(jnp.asarray(bits, jnp.float32), MIN_BITS, MAX_BITS)
    return jnp.asarray(validate_bits(bits, name=name), jnp.float32)


def validate_bits(bits, *, name: str = "bits") -> float:
    """The concrete (untraced) checks of :func:`check_bits`, returning a Python float.

    Pure Python/numpy: never touches a JAX backend, so it is safe at import time (before
    ``jax.distributed.initialize``).
    """
    if isinstance(bits, bool):
        raise ValueError(f"{name} must be a real number in [{MIN_BITS:g}, {MAX_BITS:g}], got bool {bits!r}")
    if isinstance(bits, numbers.Real):
        value = float(bits)
    else:
        arr = np.asarray(bits)
        if arr.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a real number in [{MIN_BITS:g}, {MAX_BITS:g}], got {bits!r}")
        value = float(arr)
    if not math.isfinite(value) or not (MIN_BITS <= value <= MAX_BITS):
        raise ValueError(
            f"{name}={value!r} is not allowed: use a finite real number in [{MIN_BITS:g}, {MAX_BITS:g}]"
        )
    return value


def _normalize_axes(channel_axis: Axis, ndim: int) -> tuple[int, ...] | None:
    if channel_axis is None:
        return None
    axes = (channel_axis,) if isinstance(channel_axis, numbers.Integral) else tuple(channel_axis)
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral) or isinstance(a, bool):
            raise ValueError(f"channel_axis entries must be ints, got {a!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"channel_axis={channel_axis!r} is out of range for an array of rank {ndim}: "
                f"allowed axes are {-ndim}..{ndim - 1}"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"channel_axis={channel_axis!r} names an axis twice")
    return tuple(sorted(out))


def _check_layout(shape, channel_axis: Axis, group_size):
    """Returns (axes kept, group_size) after validating them against ``shape``."""
    ndim = len(shape)
    axes = _normalize_axes(channel_axis, ndim)
    if group_size is None:
        return axes, None
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not allowed: use a positive int or None")
    if ndim != 2 or axes != (1,):
        raise ValueError(
            f"group_size={group_size} needs a 2-D x with channel_axis=-1 (or 1); got x of shape "
            f"{tuple(shape)} with channel_axis={channel_axis!r}"
        )
    if shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide axis 0 of x (size {shape[0]}): "
            f"use a divisor of {shape[0]}"
        )
    return axes, int(group_size)


def _grouped(x, axes, group_size):
    """fp32 view of x on which scales are reduced, and the axes to reduce over."""
    xf = x.astype(jnp.float32)
    if group_size is not None:
        xf = xf.reshape(x.shape[0] // group_size, group_size, x.shape[1])
        return xf, (1,)
    if axes is None:
        return xf, tuple(range(x.ndim))
    return xf, tuple(a for a in range(x.ndim) if a not in axes)


def _exp2(b):
    """2**b in fp32, exact at integer b.

    XLA's exp2 is off by an ulp at some integers (2**15 comes out as 32767.98 on CPU), which would
    make floor(2**(b-1)) lose a code; splitting off the integer part and using ldexp avoids that.
    """
    n = jnp.floor(b)
    return jnp.ldexp(jnp.exp2(b - n), n.astype(jnp.int32))


def _codes(xf, bits, symmetric: bool, reduce_axes):
    """Integer-valued fp32 codes, scale and zero (offset) for fp32 ``xf``."""
    if symmetric:
        amax = jnp.max(jnp.abs(xf), axis=reduce_axes, keepdims=True)
        half_levels = _exp2(bits - 1.0)
        qmax = half_levels - 1.0
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        top = jnp.floor(half_levels)
        codes = jnp.clip(jnp.round(xf / scale), -top, top - 1.0)
        return codes, scale, jnp.zeros_like(scale)
    lo = jnp.min(xf, axis=reduce_axes, keepdims=True)
    hi = jnp.max(xf, axis=reduce_axes, keepdims=True)
    return range_codes(xf, lo, hi, bits)


def range_codes(xf, lo, hi, bits):
    """Asymmetric codes of float32 ``xf`` on the range ``[lo, hi]`` (broadcastable to ``xf``).

    Returns float32 ``(codes, scale, zero)``: ``scale = (hi - lo) / (2**bits - 1)`` (1 for an empty
    range), ``zero = lo``, codes ``clip(round((xf - lo) / scale), 0, floor(2**bits) - 1)``, so
    ``codes * scale + zero`` is the quantized value. Dynamic (min/max) and static (calibrated)
    activation quantization both use it.
    """
    span = hi - lo
    levels = _exp2(bits)
    # A product with the reciprocal, written out: XLA turns a division by a constant or a broadcast
    # scalar into one anyway, so this is what a jitted call computes, and now an eager one too.
    scale = jnp.where(span > 0, span * (1.0 / (levels - 1.0)), 1.0)
    codes = jnp.clip(jnp.round((xf - lo) / scale), 0.0, jnp.floor(levels) - 1.0)
    return codes, scale, lo


def quantize_codes(x, bits, *, symmetric: bool = True, channel_axis: Axis = None, group_size=None):
    """Integer codes and scales of ``x`` at ``bits`` (no gradient; for freezing and export).

    Returns ``(codes, scale, zero)``, all float32. ``codes`` has x's shape and integer values
    (symmetric: in [-floor(2^(b-1)), floor(2^(b-1)) - 1]; asymmetric: in [0, floor(2^b) - 1]).
    ``scale`` and ``zero`` broadcast against x, with size 1 on reduced axes; with ``group_size=g``
    they have shape (rows // g, 1, cols) and broadcast against x reshaped to (rows // g, g, cols).
    ``dequantize(codes, scale, zero)`` gives the fake-quantized values. ``zero`` is 0 when symmetric.
    """
    x = jnp.asarray(x)
    _check_dtype(x)
    b = check_bits(bits)
    axes, g = _check_layout(x.shape, channel_axis, group_size)
    xf, reduce_axes = _grouped(x, axes, g)
    codes, scale, zero = _codes(xf, b, symmetric, reduce_axes)
    return codes.reshape(x.shape), scale, zero


def dequantize(codes, scale, zero=None, dtype=jnp.float32):
    """``codes * scale + zero`` in ``dtype``; handles the grouped layout of ``quantize_codes``."""
    codes = jnp.asarray(codes, jnp.float32)
    if jnp.ndim(scale) == 3 and codes.ndim == 2:
        n_groups = scale.shape[0]
        c = codes.reshape(n_groups, codes.shape[0] // n_groups, codes.shape[1])
        out = c * scale + (0.0 if zero is None else zero)
        return out.reshape(codes.shape).astype(dtype)
    return (codes * scale + (0.0 if zero is None else zero)).astype(dtype)


def _check_dtype(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array (fp32, bf16, fp16), got dtype {x.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fake_quant(x, bits, symmetric, axes, group_size):
    xf, reduce_axes = _grouped(x, axes, group_size)
    codes, scale, zero = _codes(xf, bits, symmetric, reduce_axes)
    return (codes * scale + zero).reshape(x.shape).astype(x.dtype)


def _fake_quant_fwd(x, bits, symmetric, axes, group_size):
    return _fake_quant(x, bits, symmetric, axes, group_size), bits


def _fake_quant_bwd(symmetric, axes, group_size, bits, g):
    # Straight-through: absmax and min/max scaling put every element inside the quantizer's range,
    # so the gradient passes unchanged everywhere. Scales and bits get none.
    return g, jnp.zeros_like(bits)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def quantize(x, bits, *, symmetric: bool = True, channel_axis: Axis = None, group_size=None):
    """Fake-quantizes ``x`` to a (possibly fractional, possibly traced) bit-width.

    Args:
      x: floating array (fp32, bf16 or fp16); the result has its shape and dtype.
      bits: real bit-width in [2, 16]: a Python number or a JAX scalar, possibly traced. Concrete
        out-of-range, NaN or infinite values raise ``ValueError``; a traced value is clipped to
        [2, 16] (a traced NaN yields NaN outputs).
      symmetric: narrow-range absmax quantizer (paper's main form) if True, else min/max
        (asymmetric, wide range; the scale divides by ``2**b - 1``, see the module docstring).
      channel_axis: None for one scale per tensor; an int or tuple of ints to keep one scale per
        index along those axes (``-1`` on an (in, out) kernel: per output channel; ``(0, 1)`` on
        (batch, tokens, features): per token).
      group_size: with a 2-D ``x`` and ``channel_axis=-1``, one scale per group of ``group_size``
        rows and per column.

    Returns:
      ``scale * codes (+ zero)`` cast to ``x.dtype``. The gradient with respect to ``x`` is the
      identity (straight-through estimator); ``bits`` and the scales get no gradient.
    """
    x = jnp.asarray(x)
    _check_dtype(x)
    b = check_bits(bits)
    axes, g = _check_layout(x.shape, channel_axis, group_size)
    return _fake_quant(x, b, bool(symmetric), axes, g)
