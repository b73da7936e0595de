"""The pieces the full-size builds use (``benchmarks/fullsize_qnn.py``): a graph over the protobuf
limit is saved with external data and runs the same (``qnn_parts.save_graph``, the limit lowered so
that a tiny graph crosses it)."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fraqat_jax.export import qnn_parts  # noqa: E402


def _graph():
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), w


@pytest.mark.parametrize("limit, external", [(2**30, False), (1000, True)])
def test_save_graph_external_data(tmp_path, monkeypatch, limit, external):
    monkeypatch.setattr(qnn_parts, "EXTERNAL_DATA_BYTES", limit)
    model, w = _graph()
    path = str(tmp_path / "part.onnx")
    assert qnn_parts.save_graph(model, path) is external
    assert os.path.exists(path + ".data") is external
    assert (os.path.getsize(path) < w.nbytes) is external  # the weights live beside the graph
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
