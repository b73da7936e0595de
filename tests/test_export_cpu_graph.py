"""The CPU form of an exported graph (``fraqat_jax.export.cpu_graph.exact_products``): each quantized
product computed as the frozen JAX student computes it, so onnxruntime's CPU and JAX give the same
bits; and the frozen student's static-range arithmetic against a numpy formula."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fraqat_jax  # noqa: E402
from fraqat_jax.export.cpu_graph import exact_products  # noqa: E402
from fraqat_jax.export.onnx import static_view, to_onnx  # noqa: E402
from fraqat_jax.export.qnn_graph import cpu_session  # noqa: E402
from fraqat_jax.nn import quantized_layers  # noqa: E402
from fraqat_jax.quant import static_codes  # noqa: E402


class _Chain(nnx.Module):
    """Two linear layers without bias, the second reading the first's output directly (no float op
    between; XLA:CPU fuses a product into a following add, a bias too, as one fused multiply-add)."""

    def __init__(self, *, rngs):
        self.up = nnx.Linear(64, 96, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(96, 40, use_bias=False, rngs=rngs)

    def __call__(self, hidden_states):
        return self.down(self.up(hidden_states))


def _model(rules, seed=0):
    model = _Chain(rngs=nnx.Rngs(seed))
    fraqat_jax.quantize_model(model, rules)
    rng = np.random.default_rng(seed)
    fraqat_jax.calibrate(model, [rng.standard_normal((4, 7, 64)).astype(np.float32)])
    return model


RANDOM_ROWS = 5


def _inputs(model, seed=1):
    """Random rows and, for the first layer, rows on and one ulp either side of rounding boundaries
    ``(k + 1/2) * scale`` of its grid, where two quantizer formulas can part."""
    rng = np.random.default_rng(seed)
    up = dict(quantized_layers(model))["up"]
    lo, hi = np.asarray(up.act_range[...], np.float32)
    scale = (hi - lo) / np.float32(255.0)
    k = rng.integers(-100, 100, (3, 64))
    edge = ((k + 0.5) * scale).astype(np.float32)
    rows = [rng.standard_normal((RANDOM_ROWS, 64)).astype(np.float32), edge, np.nextafter(edge, np.float32(np.inf)),
            np.nextafter(edge, np.float32(-np.inf))]
    return np.concatenate(rows)[None]  # (1, 14, 64)


W4A8 = [fraqat_jax.Rule(".*", weight_bits=4, act_bits=8, channel_axis=-1, layer_types=("Linear",))]


@pytest.mark.parametrize("rules", [W4A8, [fraqat_jax.Rule("up", weight_bits=4, act_bits=8, channel_axis=None),
                                          fraqat_jax.Rule("down", weight_bits=8, act_bits=8, channel_axis=-1)]],
                         ids=["w4_per_channel", "w4_tensor_w8_channel"])
def test_cpu_graph_products_are_the_frozen_students_bits(rules):
    model = _model(rules)
    x = _inputs(model)
    frozen = fraqat_jax.freeze(static_view(model))
    want = np.asarray(frozen(jnp.asarray(x)))
    graph = to_onnx(model, {"hidden_states": x}, frozen=frozen, batch_size=1).proto
    cpu, done, left = exact_products(graph)
    assert (done, left) == (2, 0)
    assert "QuantizeLinear" not in {n.op_type for n in cpu.graph.node}  # the codes: x * (1 / s), rounded
    onnx.checker.check_model(cpu, full_check=True)
    got = cpu_session(cpu.SerializeToString()).run(None, {"hidden_states": x})[0]
    np.testing.assert_array_equal(got, want)  # bit for bit, boundary inputs included
    # The QDQ graph itself (float products of the dequantized values) agrees to float32 rounding on
    # the random rows; on the boundary rows its codes may part from the student's by a step.
    qdq = cpu_session(graph.SerializeToString()).run(None, {"hidden_states": x})[0][:, :RANDOM_ROWS]
    assert np.abs(qdq - want[:, :RANDOM_ROWS]).max() <= 1e-3 * np.abs(want).max()


def test_frozen_static_layer_follows_the_integer_grid_formula():
    """A frozen linear layer with a static range, against numpy: codes ``clip(rint(x * (1 / s)) + z)``,
    output ``s_w * (s * ((q - z) . q_w))`` in float32, the sum in integers."""
    model = _model(W4A8)
    x = _inputs(model)[0]
    frozen = fraqat_jax.freeze(static_view(model))
    up = dict(quantized_layers(model))["up"]
    lo, hi = np.asarray(up.act_range[...], np.float32)
    s = np.float32(static_codes(jnp.zeros(()), lo, hi, 8.0)[1])  # the scale as training computes it
    assert abs(s - (hi - lo) / 255) <= 1e-6 * s
    inv = np.float32(1.0) / s
    z = np.clip(np.rint(-lo * inv), 0, 255)
    q = np.clip(np.rint(x * inv) + z, 0, 255).astype(np.int64)
    layer = frozen.up
    codes = np.asarray(layer.weight_codes(), np.int64)
    sw = np.asarray(layer.kernel_scale[...], np.float32).reshape(-1)
    want = sw * (s * ((q - np.int64(z)) @ codes).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x))), want.astype(np.float32))


def test_grouped_weights_are_left_as_float_products():
    """A per-group weight scale has no single rescale per output: that product stays the QDQ
    graph's float matmul (counted as left), within float32 rounding of the frozen student."""
    rules = [fraqat_jax.Rule("up", weight_bits=4, act_bits=8, channel_axis=-1, group_size=16),
             fraqat_jax.Rule("down", weight_bits=4, act_bits=8, channel_axis=-1)]
    model = _model(rules)
    x = _inputs(model)
    frozen = fraqat_jax.freeze(static_view(model))
    want = np.asarray(frozen(jnp.asarray(x)))
    cpu, done, left = exact_products(to_onnx(model, {"hidden_states": x}, frozen=frozen, batch_size=1).proto)
    assert (done, left) == (1, 1)
    got = cpu_session(cpu.SerializeToString()).run(None, {"hidden_states": x})[0]
    assert np.abs(got - want)[:, :RANDOM_ROWS].max() <= 1e-3 * np.abs(want).max()
