"""fraqat_jax.quantize against an independent float64 numpy implementation of the paper's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fraqat_jax import quantize
from fraqat_jax.quant import dequantize, quantize_codes


def ref_quantize(x, b, symmetric=True, channel_axis=None, group_size=None):
    """float64 numpy reference. Returns (values, codes)."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    if group_size is not None:
        x = x.reshape(shape[0] // group_size, group_size, shape[1])
        red = (1,)
    elif channel_axis is None:
        red = tuple(range(x.ndim))
    else:
        keep = {a % x.ndim for a in np.atleast_1d(channel_axis)}
        red = tuple(a for a in range(x.ndim) if a not in keep)
    if symmetric:
        amax = np.abs(x).max(axis=red, keepdims=True)
        s = amax / (2.0 ** (b - 1) - 1)
        s = np.where(amax > 0, s, 1.0)
        q = np.clip(np.round(x / s), -math.floor(2 ** (b - 1)), math.floor(2 ** (b - 1)) - 1)
        v = s * q
    else:
        lo, hi = x.min(axis=red, keepdims=True), x.max(axis=red, keepdims=True)
        s = np.where(hi > lo, (hi - lo) / (2.0**b - 1), 1.0)
        q = np.clip(np.round((x - lo) / s), 0, math.floor(2.0**b) - 1)
        v = s * q + lo
    return v.reshape(shape), q.reshape(shape), s


def assert_on_grid(got, x, b, **kw):
    """Values equal the reference up to fp32 rounding; a code may differ by one only at a tie."""
    ref, codes, s = ref_quantize(x, b, **kw)
    got = np.asarray(got, np.float64)
    step = np.broadcast_to(s, codes.shape if kw.get("group_size") is None else s.shape)
    if kw.get("group_size") is not None:
        step = np.broadcast_to(s, (s.shape[0], kw["group_size"], s.shape[2])).reshape(x.shape)
    err = np.abs(got - ref)
    # fp32 arithmetic: relative error on the value, plus the rounding of the offset min(x) added back.
    tol = 1e-5 * np.maximum(np.abs(ref), step) + 5e-7 * np.abs(np.asarray(x, np.float64)).max()
    bad = err > tol
    # fp32 and fp64 may round x/s differently when it sits near a .5 tie (fp32 error grows with |x/s|).
    if kw.get("symmetric", True):
        ratio = np.asarray(x, np.float64) / step
    else:
        lo = ref - codes * step
        ratio = (np.asarray(x, np.float64) - lo) / step
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < np.maximum(1e-4, 1e-6 * np.abs(ratio))
    assert not np.any(bad & ~near_tie), (got[bad], ref[bad])
    assert np.all(err[bad] <= step[bad] * 1.0001)


BITS = [2, 3, 4, 4.25, 4.5, 4.75, 5, 5.5, 6, 7, 8, 16, 2.3, 11.7]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "layout",
    [dict(), dict(channel_axis=-1), dict(channel_axis=0), dict(channel_axis=-1, group_size=4)],
    ids=["tensor", "out_channel", "in_channel", "group4"],
)
def test_matches_numpy_reference(bits, symmetric, layout):
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    got = quantize(jnp.asarray(x), bits, symmetric=symmetric, **layout)
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert_on_grid(got, x, bits, symmetric=symmetric, **layout)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    bits=st.floats(2, 16),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
)
def test_hypothesis_any_shape_and_bits(x, bits, symmetric, per_channel):
    kw = dict(channel_axis=-1) if per_channel else {}
    got = quantize(jnp.asarray(x), bits, symmetric=symmetric, **kw)
    assert_on_grid(got, x, bits, symmetric=symmetric, **kw)


def test_per_token_activations():
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    got = quantize(jnp.asarray(x), 8, channel_axis=(0, 1))
    assert_on_grid(got, x, 8, channel_axis=(0, 1))
    # One scale per token: each token's max maps exactly onto the top level.
    amax = np.abs(x).max(-1)
    np.testing.assert_allclose(np.abs(np.asarray(got)).max(-1), amax, rtol=1e-6)


@pytest.mark.parametrize(
    "bits,lo,hi,reached_lo",
    # The paper's ranges: INT6 [-32, 31], INT5.5 [-22, 21], INT5 [-16, 15]. With absmax scaling at
    # integer bits max|x| maps to 2^(b-1) - 1, so the bottom code -2^(b-1) is only reached at
    # fractional bits, where -max|x| / scale = -(2^(b-1) - 1) rounds down past it.
    [(6, -32, 31, -31), (5.5, -22, 21, -22), (5, -16, 15, -15), (4, -8, 7, -7), (4.5, -11, 10, -10)],
)
def test_paper_code_ranges(bits, lo, hi, reached_lo):
    x = jnp.linspace(-3.0, 3.0, 1001)
    codes, scale, zero = quantize_codes(x, bits)
    codes = np.asarray(codes)
    assert codes.min() == reached_lo and codes.max() == hi
    assert lo <= reached_lo
    np.testing.assert_allclose(float(scale.squeeze()), 3.0 / (2 ** (bits - 1) - 1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), 0.0)
    np.testing.assert_allclose(np.asarray(dequantize(codes, scale, zero)), np.asarray(quantize(x, bits)), rtol=1e-6)
    assert len(np.unique(np.asarray(quantize(x, bits)))) == hi - reached_lo + 1
    # The clip bounds themselves: the most negative value reachable sits one code below -qmax.
    skew = jnp.concatenate([x, jnp.asarray([-3.0 * (1 + 0.49 / (2 ** (bits - 1) - 1))])])
    c2, _, _ = quantize_codes(skew, bits)
    assert np.asarray(c2).min() >= lo


def test_asymmetric_codes_and_ends():
    x = jnp.asarray(np.random.default_rng(2).uniform(-0.5, 2.0, size=300), jnp.float32)
    codes, scale, zero = quantize_codes(x, 4, symmetric=False)
    assert np.asarray(codes).min() == 0 and np.asarray(codes).max() == 15
    q = np.asarray(quantize(x, 4, symmetric=False))
    # With the 2^b - 1 denominator both ends of the range are grid points at integer bits.
    np.testing.assert_allclose(q.min(), float(x.min()), rtol=1e-6)
    np.testing.assert_allclose(q.max(), float(x.max()), rtol=1e-5)
    codes55, _, _ = quantize_codes(x, 5.5, symmetric=False)
    assert np.asarray(codes55).max() == math.floor(2**5.5) - 1


def test_grouped_codes_roundtrip():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(12, 5)), jnp.float32)
    codes, scale, zero = quantize_codes(x, 4, channel_axis=-1, group_size=3)
    assert scale.shape == (4, 1, 5) and codes.shape == x.shape
    np.testing.assert_allclose(
        np.asarray(dequantize(codes, scale, zero)),
        np.asarray(quantize(x, 4, channel_axis=-1, group_size=3)),
        rtol=1e-6,
    )


def test_error_shrinks_with_bits():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(64, 64)), jnp.float32)
    errs = [float(jnp.mean((quantize(x, b) - x) ** 2)) for b in (8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4)]
    assert all(a < b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", [dict(), dict(channel_axis=-1), dict(channel_axis=-1, group_size=2)])
def test_straight_through_gradient(symmetric, layout):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(6).normal(size=(4, 3)), jnp.float32)

    def f(x, b):
        return jnp.sum(w * quantize(x, b, symmetric=symmetric, **layout))

    gx = jax.grad(f)(x, 4.5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(w))
    # No gradient flows to bits (and asking for one is not an error).
    assert float(jax.grad(f, argnums=1)(x, jnp.float32(4.5))) == 0.0


def test_one_compilation_over_a_schedule():
    traces = []

    @jax.jit
    def f(x, bits):
        traces.append(1)
        return quantize(x, bits, channel_axis=-1)

    x = jnp.asarray(np.random.default_rng(7).normal(size=(32, 8)), jnp.float32)
    outs = []
    for b in (8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4):
        out = f(x, jnp.float32(b))
        assert_on_grid(out, np.asarray(x), b, channel_axis=-1)
        outs.append(out)
    assert len(traces) == 1
    assert len({np.asarray(o).tobytes() for o in outs}) == 9


def test_traced_out_of_range_bits_are_clipped():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(50,)), jnp.float32)
    f = jax.jit(quantize)
    np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(1.0))), np.asarray(quantize(x, 2)))
    np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(30.0))), np.asarray(quantize(x, 16)))
    assert np.all(np.isnan(np.asarray(f(x, jnp.float32(np.nan)))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_kept(dtype):
    x = jnp.asarray(np.random.default_rng(9).normal(size=(8, 8)), dtype)
    out = quantize(x, 4, channel_axis=-1)
    assert out.dtype == dtype
    ref, _, _ = ref_quantize(np.asarray(x, np.float32), 4, channel_axis=-1)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
    g = jax.grad(lambda x: jnp.sum(quantize(x, 4).astype(jnp.float32)))(x)
    assert g.dtype == dtype


def test_zero_tensor_stays_zero():
    assert np.all(np.asarray(quantize(jnp.zeros((3, 3)), 4)) == 0)
    assert np.all(np.asarray(quantize(jnp.zeros((3, 3)), 4, symmetric=False)) == 0)


@pytest.mark.parametrize("bits", [1.99, 16.01, 0, -4, float("nan"), float("inf"), np.float32(17)])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match=r"bits.*\[2, 16\]"):
        quantize(jnp.ones(4), bits)


@pytest.mark.parametrize(
    "kw,shape,match",
    [
        (dict(channel_axis=2), (4, 4), "channel_axis=2"),
        (dict(channel_axis=(0, -3)), (4, 4), "channel_axis"),
        (dict(channel_axis=-1, group_size=3), (4, 4), "group_size=3"),
        (dict(channel_axis=0, group_size=2), (4, 4), "group_size=2"),
        (dict(channel_axis=-1, group_size=2), (4, 4, 4), "group_size=2"),
        (dict(channel_axis=-1, group_size=0), (4, 4), "group_size=0"),
    ],
)
def test_bad_layout_raises(kw, shape, match):
    with pytest.raises(ValueError, match=match):
        quantize(jnp.ones(shape), 4, **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="scalar"):
        quantize(jnp.ones(4), jnp.ones(2) * 4)
    with pytest.raises(ValueError, match="floating"):
        quantize(jnp.ones(4, jnp.int32), 4)


def test_rel_diff_is_the_largest_difference_over_the_largest_reference():
    """``quant.rel_diff``, the one relative difference of the export checks, by hand: one pair, and a
    set of pairs sharing one scale (the largest |ref| of all of them)."""
    from fraqat_jax.quant import rel_diff

    ref = [np.array([1.0, -4.0]), np.array([[0.5, 2.0]])]
    got = [np.array([1.5, -4.0]), np.array([[0.5, 2.25]], np.float32)]
    assert rel_diff(got[0], ref[0]) == 0.5 / 4.0
    assert rel_diff(got[1], ref[1]) == 0.25 / 2.0
    assert rel_diff(got, ref) == 0.5 / 4.0  # not the mean, not per-pair scales
    assert rel_diff(tuple(reversed(got)), tuple(reversed(ref))) == 0.5 / 4.0
    assert rel_diff(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match=r"one shape, got \(2,\) and \(1, 2\)"):
        rel_diff(got[0], ref[1])
    with pytest.raises(ValueError, match="one length"):
        rel_diff(got, ref[:1])
