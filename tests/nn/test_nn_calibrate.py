"""calibrate(): static activation ranges at mean +/- 3 std of each layer's input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_models import MLP, np_sym_quant
from flax import nnx

from fraqat_jax.nn import ActRange, Rule, calibrate, quantize_model


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_calibration_sets_mean_plus_minus_three_sigma():
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=6, act_bits=8, act_granularity="tensor")])
    batches = [jax.random.normal(jax.random.key(i), (5, 16)) * (1 + i) + i for i in range(3)]
    ranges = lambda: [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, ActRange))]
    assert len(ranges()) == 3 and all(np.isnan(r).all() for r in ranges())
    calibrate(model, batches)
    assert all(np.isfinite(r).all() for r in ranges())
    # Inputs of each layer in float64 numpy: weights at 6 bits, inputs unquantized while calibrating.
    inputs = [[np.asarray(b, np.float64) for b in batches]]
    for i, layer in enumerate(model.layers[:-1]):
        w = np_sym_quant(np.asarray(layer.kernel[...]), 6)[0]
        inputs.append([_np_gelu(h @ w + np.asarray(layer.bias[...])) for h in inputs[-1]])
    for layer, xs in zip(model.layers, inputs):
        pooled = np.concatenate([h.ravel() for h in xs])
        lo, hi = pooled.mean() - 3 * pooled.std(), pooled.mean() + 3 * pooled.std()
        # nudged to an integer zero point (the standard nudge, written out here independently)
        step = (hi - lo) / 255
        zp = np.clip(np.round(-lo / step), 0, 255)
        want = [-zp * step, (255 - zp) * step]
        got = np.asarray(layer.act_range[...], np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert abs(got[0] - lo) <= 0.5 * step + 1e-4 and abs(got[1] - hi) <= 0.5 * step + 1e-4
        z = -got[0] / ((got[1] - got[0]) / 255)
        assert abs(z - round(z)) < 1e-3  # zero is a code
        assert layer.act_ranges == "static"


def test_static_forward_uses_the_calibrated_range_and_clips():
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=None, act_bits=8)])
    x = jax.random.normal(jax.random.key(0), (8, 16))
    calibrate(model, [x])
    layer = model.layers[0]
    lo, hi = np.asarray(layer.act_range[...], np.float64)
    xn = np.asarray(x, np.float64)
    scale = (hi - lo) / 255
    xq = np.clip(np.round((xn - lo) / scale), 0, 255) * scale + lo
    want = xq @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)
    # Straight-through inside the range, zero gradient where the input is clipped.
    x_big = x.at[0, 0].set(hi + 10.0)
    g = jax.grad(lambda v: layer(v).sum())(x_big)
    assert float(g[0, 0]) == 0.0 and float(jnp.abs(g[1]).min()) > 0


def test_static_rule_without_calibration_raises():
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", act_ranges="static")])
    with pytest.raises(RuntimeError, match="calibrate"):
        model(jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])
