"""The graph rewrites the pipeline folder adds before the QNN form, checked with onnxruntime's CPU
provider on one-node-pattern graphs: the rewritten graph computes what the original does."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fraqat_jax.export.qnn_pipeline import mask_wheres_as_adds, tanh_as_sigmoid  # noqa: E402


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("to_bool", ["Greater", "Cast"])
def test_masked_softmax_without_booleans_computes_the_same(to_bool):
    """Where(And(causal, key mask), logits, -max float) -> softmax, as Sana's cross-attention and
    Gemma-2's self-attention trace: the same weights with the mask in float, no boolean left."""
    causal = np.tril(np.ones((4, 4), bool))[None, None]
    first = (helper.make_node("Greater", ["mask", "half"], ["b"]) if to_bool == "Greater"
             else helper.make_node("Cast", ["mask"], ["b"], to=TensorProto.BOOL))
    nodes = [first, helper.make_node("Unsqueeze", ["b", "axes"], ["b4"]),
             helper.make_node("And", ["causal", "b4"], ["both"]),
             helper.make_node("Where", ["both", "x", "neg"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    inits = [numpy_helper.from_array(np.float32(0.5), "half"), numpy_helper.from_array(np.asarray([1, 2], np.int64), "axes"),
             numpy_helper.from_array(causal, "causal"),
             numpy_helper.from_array(np.full((1, 2, 4, 4), np.finfo(np.float32).min, np.float32), "neg")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                           helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.standard_normal((1, 2, 4, 4)) * 10).astype(np.float32), "mask": np.asarray([[1, 1, 0, 1]], np.float32)}
    ref = _run(model, feeds)
    assert mask_wheres_as_adds(model, bias=200.0) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Where", "And", "Greater"} and not any(
        n.op_type == "Cast" and n.attribute[0].i == TensorProto.BOOL for n in model.graph.node)
    got = _run(model, feeds)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.all(got[..., 2] == 0)  # the masked key gets no weight


def test_tanh_as_sigmoid_computes_tanh():
    model = _model([helper.make_node("Tanh", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], [])
    x = np.linspace(-8, 8, 64, dtype=np.float32)
    assert tanh_as_sigmoid(model) == 1 and "Tanh" not in {n.op_type for n in model.graph.node}
    np.testing.assert_allclose(_run(model, {"x": x}), np.tanh(x), atol=1e-6)
