"""QNN HTP form: the export runs whole on Qualcomm's QNN HTP backend (the simulator in
the ``onnxruntime-qnn`` wheel), with CPU fallback disabled, and agrees with onnxruntime's CPU
provider and with the JAX model; each rule of the graph is checked against the backend itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_qnn")

import jax  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fraqat_jax  # noqa: E402
from fraqat_jax.diffusion import model_kwargs  # noqa: E402
from fraqat_jax.export import jaxpr_onnx, qnn, qnn_graph  # noqa: E402
from fraqat_jax.export.onnx import frozen_output, static_view  # noqa: E402
from test_export_onnx import CONFIGS, CONV_W4A8, W4A8, _inputs, _random_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _save(nodes, inits, inputs, outputs, path):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def _pack(codes: np.ndarray) -> bytes:
    """ONNX INT4: two's-complement nibbles, element 0 in the low nibble."""
    flat = codes.reshape(-1).astype(np.uint8) & 0xF
    flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _matmul_graph(path, *, zero_point: bool, out_bits: int | None, per_channel: bool = True, k=64, n=32, m=16,
                  carry16: bool = False):
    """x -> Q/DQ uint8 -> [Q/DQ uint16 of the same grid] -> MatMul with an INT4 weight -> [Q/DQ] -> y;
    returns the path and x."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, (k, n)).astype(np.int8)
    scale = (rng.random(n).astype(np.float32) * 0.02 + 0.01) if per_channel else np.float32(0.02)
    shape = [n] if per_channel else []
    inits = [TensorProto(name="w", data_type=TensorProto.INT4, dims=[k, n], raw_data=_pack(codes)),
             numpy_helper.from_array(np.asarray(scale), "ws"),
             numpy_helper.from_array(np.asarray(np.float32(4 / 255)), "xs"),
             numpy_helper.from_array(np.asarray(np.uint8(128)), "xz")]
    dq_w = ["w", "ws"]
    if zero_point:
        inits.append(TensorProto(name="wz", data_type=TensorProto.INT4, dims=shape, raw_data=bytes((max(n if per_channel else 1, 1) + 1) // 2)))
        dq_w.append("wz")
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", dq_w, ["wd"], **({"axis": 1} if per_channel else {})),
             helper.make_node("MatMul", ["xd16" if carry16 else "xd", "wd"], ["y0" if out_bits else "y"])]
    if carry16:  # the uint8 grid in uint16 codes: scale / 257, zero point x 257
        inits += [numpy_helper.from_array(np.asarray(np.float32(4 / 255) / np.float32(257)), "xs16"),
                  numpy_helper.from_array(np.asarray(np.uint16(128 * 257)), "xz16")]
        nodes[2:2] = [helper.make_node("QuantizeLinear", ["xd", "xs16", "xz16"], ["xq16"]),
                      helper.make_node("DequantizeLinear", ["xq16", "xs16", "xz16"], ["xd16"])]
    if out_bits:
        top = 2**out_bits - 1
        dtype = np.uint8 if out_bits == 8 else np.uint16
        inits += [numpy_helper.from_array(np.asarray(np.float32(8 / top)), "ys"),
                  numpy_helper.from_array(np.asarray(dtype((top + 1) // 2)), "yz")]
        nodes += [helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    x = np.round(rng.uniform(-2, 2, (m, k)) / (4 / 255)).astype(np.float32) * np.float32(4 / 255)  # on the grid
    return _save(nodes, inits, [helper.make_tensor_value_info("x", 1, [m, k])],
                 [helper.make_tensor_value_info("y", 1, [m, n])], path), x


def _accepts(path) -> bool:
    try:
        qnn.qnn_session(path)
        return True
    except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types)
        assert "fallback" in str(e).lower() or "dynamic shape" in str(e).lower(), e
        return False


def _qnn_vs_cpu(path, feeds) -> float:
    got = qnn.qnn_session(path).run(None, feeds)[0]
    ref = qnn.cpu_session(path).run(None, feeds)[0]
    return qnn.rel_diff(got, ref)


def test_rules_of_the_graph_as_the_backend_answers(tmp_path):
    """Each rule of the QNN form, established on one-node graphs against the HTP backend."""
    # A quantized product is a whole node unit: with its output re-quantized, HTP agrees with the
    # CPU within one step of the output grid (its rounding vs onnxruntime's); the same weight without the output
    # QuantizeLinear is refused (a standalone per-channel DQ).
    unit, x = _matmul_graph(tmp_path / "unit.onnx", zero_point=True, out_bits=8)
    assert _accepts(unit)
    got = qnn.qnn_session(unit).run(None, {"x": x})[0]
    ref = qnn.cpu_session(unit).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1.001 * 8 / 255  # at most one step of the output grid
    assert not _accepts(_matmul_graph(tmp_path / "no_q.onnx", zero_point=True, out_bits=None)[0])
    # An 8-bit activation with a 16-bit output is refused (HTP's MatMul: 8-bit in, 8-bit out).
    assert not _accepts(_matmul_graph(tmp_path / "u16_out.onnx", zero_point=True, out_bits=16)[0])
    # The same uint8 grid carried in uint16 (--product-bits 16) is exact: the product equals the
    # uint8 input's on the CPU; HTP takes it with a 16-bit output and agrees within one step of that
    # grid plus its fp16 accumulation, 50x closer than the 8-bit unit above.
    plain, x = _matmul_graph(tmp_path / "plain.onnx", zero_point=True, out_bits=None)
    carried, _ = _matmul_graph(tmp_path / "carried.onnx", zero_point=True, out_bits=None, carry16=True)
    np.testing.assert_allclose(qnn.cpu_session(carried).run(None, {"x": x})[0],
                               qnn.cpu_session(plain).run(None, {"x": x})[0], rtol=1e-6, atol=1e-6)
    unit16, _ = _matmul_graph(tmp_path / "unit16.onnx", zero_point=True, out_bits=16, carry16=True)
    assert _accepts(unit16)
    got = qnn.qnn_session(unit16).run(None, {"x": x})[0]
    ref = qnn.cpu_session(plain).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 8 / 255 / 50
    # Without an explicit zero point the per-tensor INT4 weight is taken but misread.
    no_zp, x = _matmul_graph(tmp_path / "no_zp.onnx", zero_point=False, out_bits=None, per_channel=False)
    with_zp, _ = _matmul_graph(tmp_path / "zp.onnx", zero_point=True, out_bits=None, per_channel=False)
    assert _qnn_vs_cpu(no_zp, {"x": x}) > 0.5
    assert _qnn_vs_cpu(with_zp, {"x": x}) < 1e-2
    # Dynamic shapes are refused.
    dyn = _save([helper.make_node("Relu", ["x"], ["y"])], [], [helper.make_tensor_value_info("x", 1, ["b", 8])],
                [helper.make_tensor_value_info("y", 1, ["b", 8])], tmp_path / "dyn.onnx")
    assert not _accepts(dyn)
    # Einsum (as the converter wrote grouped attention products before) is refused; the converter's
    # Transpose/Reshape/MatMul form of the same product is taken and exact on the CPU.
    sa, sb, so = [1, 16, 4, 16], [1, 1, 4, 16, 16], [1, 4, 16, 1, 16]
    ins = [helper.make_tensor_value_info("a", 1, sa), helper.make_tensor_value_info("b", 1, sb)]
    out = [helper.make_tensor_value_info("y", 1, so)]
    assert not _accepts(_save([helper.make_node("Einsum", ["a", "b"], ["y"], equation="acbd,eabfc->abdef")], [], ins,
                              out, tmp_path / "einsum.onnx"))
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
    closed = jax.make_jaxpr(lambda a, b: jax.numpy.einsum("acbd,eabfc->abdef", a, b))(a, b)
    conv = jaxpr_onnx.Converter()
    (y,) = conv.run(closed.jaxpr, list(closed.consts), ["a", "b"])
    conv.nodes.append(helper.make_node("Identity", [y], ["y"]))
    assert "Einsum" not in {n.op_type for n in conv.nodes} and "MatMul" in {n.op_type for n in conv.nodes}
    path = _save(conv.nodes, conv.initializers, ins, out, tmp_path / "matmul.onnx")
    ref = np.einsum("acbd,eabfc->abdef", a, b)
    np.testing.assert_allclose(qnn.cpu_session(path).run(None, {"a": a, "b": b})[0], ref, rtol=1e-5, atol=1e-5)
    got = qnn.qnn_session(path).run(None, {"a": a, "b": b})[0]  # whole on HTP, fp16
    assert qnn.rel_diff(got, ref) < 5e-3
    # Rank 6 is refused, rank 5 taken.
    for rank, ok in ((6, False), (5, True)):
        shape = [2] * rank
        perm = list(range(rank))[::-1]
        path = _save([helper.make_node("Transpose", ["x"], ["y"], perm=perm)], [],
                     [helper.make_tensor_value_info("x", 1, shape)], [helper.make_tensor_value_info("y", 1, shape)],
                     tmp_path / f"rank{rank}.onnx")
        assert _accepts(path) is ok
    # fp16 sin of timestep-sized arguments is far off (hence the host prologue); small ones are fine.
    freqs = np.geomspace(1.0, 1e-3, 16).astype(np.float32)
    t = np.asarray([999.0, 0.5], np.float32).reshape(2, 1)
    sin = _save([helper.make_node("Mul", ["t", "f"], ["a"]), helper.make_node("Sin", ["a"], ["y"])],
                [numpy_helper.from_array(freqs.reshape(1, -1), "f")], [helper.make_tensor_value_info("t", 1, [2, 1])],
                [helper.make_tensor_value_info("y", 1, [2, 16])], tmp_path / "sin.onnx")
    got = qnn.qnn_session(sin).run(None, {"t": t})[0]
    ref = np.sin(t.astype(np.float64) * freqs)
    assert np.abs(got[0] - ref[0]).max() > 2e-2  # measured 4.3e-2
    assert np.abs(got[1] - ref[1]).max() < 2e-3


def test_lower_rank_rewrites_unpatchify_exactly(tmp_path):
    b, h, w, p, c = 2, 3, 4, 2, 5
    x = np.random.default_rng(0).standard_normal((b, h * w, p * p * c)).astype(np.float32)
    inits = [numpy_helper.from_array(np.asarray([b, h, w, p, p, c], np.int64), "s6"),
             numpy_helper.from_array(np.asarray([b, c, h * p, w * p], np.int64), "s4")]
    nodes = [helper.make_node("Reshape", ["x", "s6"], ["x6"], name="r1"),
             helper.make_node("Transpose", ["x6"], ["t6"], perm=[0, 5, 1, 3, 2, 4], name="t"),
             helper.make_node("Reshape", ["t6", "s4"], ["y"], name="r2")]
    path = _save(nodes, inits, [helper.make_tensor_value_info("x", 1, list(x.shape))],
                 [helper.make_tensor_value_info("y", 1, [b, c, h * p, w * p])], tmp_path / "u.onnx")
    model = onnx.load(path)
    assert qnn.lower_rank(model) == 1
    shapes = qnn_graph._static_shapes(model)  # noqa: SLF001
    assert max(len(s) for s in shapes.values()) <= 5
    lowered = str(tmp_path / "lowered.onnx")
    onnx.save(model, lowered)
    ref = x.reshape(b, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)
    np.testing.assert_array_equal(qnn.cpu_session(lowered).run(None, {"x": x})[0], ref)
    np.testing.assert_allclose(qnn.qnn_session(lowered).run(None, {"x": x})[0], ref, atol=2e-3 * np.abs(ref).max())


def _family_feeds(family, config, seed, batch=1):
    """``(keyword arguments, flat feeds)`` of one call of ``batch`` training-style inputs."""
    inputs = _inputs(family, config, batch, seed=seed)
    if family == "flux":  # as the command line calls it: a (x_t, t, cond) batch, 2x2 packed
        x_t = np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)).astype(np.float32)
        cond = {k: inputs[k] for k in ("encoder_hidden_states", "pooled_projections", "guidance")}
        inputs = jax.tree.map(np.asarray, model_kwargs("flux", x_t, inputs["timestep"], cond))
    from fraqat_jax.export.onnx import flat_inputs

    return inputs, dict(flat_inputs(inputs)[0])


# The paper's W4A16 last layer (the ``keep`` rule's form: weights 4-bit, input unquantized), which
# the QNN form runs with uint16 input and output; every other linear layer (and Sana's feed-forward
# convolutions) W4A8.
W4A16_LAST = fraqat_jax.Rule(r"proj_out.*", weight_bits=4, act_bits=None, channel_axis=-1, layer_types=("Linear",))


def family_student(family):
    """``(model, example, calibration)``: the family's tiny config with random weights, W4A8 with
    the W4A16 last layer, static ranges calibrated as training calibrates them (mean +/- 3 std of
    16 inputs); the traced example and 16 calibration feeds for the product ranges (also
    benchmarks/qnn_agreement.py's models)."""
    class_name, config = CONFIGS[family]
    rules = [W4A16_LAST, W4A8, CONV_W4A8] if family == "sana" else [W4A16_LAST, W4A8]
    model = fraqat_jax.quantize_model(_random_model(class_name, config), rules)
    fraqat_jax.calibrate(model, [_family_feeds(family, config, seed=100, batch=16)[0]])
    example, _ = _family_feeds(family, config, seed=7)
    return model, example, [_family_feeds(family, config, seed=200 + i)[1] for i in range(16)]


def test_fp16_rounded_rounds_the_float_ops_and_leaves_products_and_qdq_alone(tmp_path):
    """x -> Mul -> Relu -> Q/DQ uint8 -> MatMul (INT8 weight) -> Q/DQ uint16 -> + ReduceSum(the Relu) -> out:
    the CPU run of fp16_rounded equals numpy with every float op's output (and the input) rounded to
    fp16, the quantized product and the graph output not rounded. Exact: Mul, Relu and Add are
    correctly rounded in float32 by numpy and onnxruntime alike."""
    rng = np.random.default_rng(3)
    k, n, m = 16, 8, 4
    w = rng.integers(-100, 101, (k, n)).astype(np.int8)
    c = (rng.random(k).astype(np.float32) + 0.5)
    xs, ws, ys = np.float32(4 / 255), np.float32(0.003), np.float32(1 / 4096)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.asarray(ws), "ws"),
             numpy_helper.from_array(np.asarray(np.int8(0)), "wz"), numpy_helper.from_array(c, "c"),
             numpy_helper.from_array(np.asarray(xs), "xs"), numpy_helper.from_array(np.asarray(np.uint8(0)), "xz"),
             numpy_helper.from_array(np.asarray(ys), "ys"), numpy_helper.from_array(np.asarray(np.uint16(32768)), "yz")]
    nodes = [helper.make_node("Mul", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("QuantizeLinear", ["b", "xs", "xz"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "xs", "xz"], ["bd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["bd", "wd"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "ys", "yz"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "ys", "yz"], ["pd"]),
             helper.make_node("ReduceSum", ["b"], ["bs"], keepdims=1),
             helper.make_node("Add", ["pd", "bs"], ["out"])]
    path = _save(nodes, inits, [helper.make_tensor_value_info("x", 1, [m, k])],
                 [helper.make_tensor_value_info("out", 1, [m, n])], tmp_path / "g.onnx")
    rounded = qnn_graph.fp16_rounded(onnx.load(path))
    casts = [nd for nd in rounded.graph.node if nd.op_type == "Cast"]
    assert len(casts) == 2 * 4  # the input, Mul, Relu, ReduceSum: not the product, the QDQ nodes or the output
    x = rng.normal(0, 1.5, (m, k)).astype(np.float32)
    got = qnn.cpu_session(rounded.SerializeToString()).run(None, {"x": x})[0]

    def h(v):
        return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)

    b = h(np.maximum(h(h(x) * c), 0))
    bd = np.clip(np.round(b / xs), 0, 255).astype(np.float32) * xs
    p = bd @ (w.astype(np.float32) * ws)  # float32 sums in another order than onnxruntime's: < 1 uint16 step
    pd = (np.clip(np.round(p / ys) + 32768, 0, 65535) - 32768).astype(np.float32) * ys
    bs = h(b.sum(dtype=np.float32))  # ReduceSum without axes: over all of them
    ref = pd + bs
    # One uint16 step of the product and one fp16 spacing of the sum, where a float32 sum order flips them.
    assert np.abs(got - ref).max() <= ys * 1.0001 + float(np.spacing(np.float16(abs(bs))))
    assert np.mean(got == ref) > 0.5
    plain = qnn.cpu_session(path).run(None, {"x": x})[0]
    assert not np.array_equal(plain, got)  # the rounding does something on this input


def test_ort_tolerance_is_the_fixed_floor_or_a_multiple_of_the_fp16_sensitivity_capped_at_the_jax_one():
    assert qnn.ort_tolerance(0.0) == qnn.TOL_ORT
    assert qnn.ort_tolerance(qnn.TOL_ORT / qnn.TOL_FP16 / 2) == qnn.TOL_ORT
    s = 1.2 * qnn.TOL_ORT / qnn.TOL_FP16
    assert qnn.ort_tolerance(s) == pytest.approx(qnn.TOL_FP16 * s)
    assert qnn.ort_tolerance(1.0) == qnn.TOL_STUDENT


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_family_runs_whole_on_qnn_htp(family, tmp_path):
    _, config = CONFIGS[family]
    model, example, calibration = family_student(family)
    written = qnn.write_qnn(model, example, calibration, str(tmp_path))
    graph = written["model"].graph
    layers = written["counts"]["quantized_layers"]
    # Every product 16-bit: the W4A16 last layer, and each A8 layer's trained grid carried in uint16.
    qdq = written["qdq"]
    assert qdq["products"] >= layers and qdq["out16"] == qdq["products"] and "out8" not in qdq
    assert qdq["act8_in16"] == qdq["products"] - qdq["act16"] >= layers - 1
    assert not any(n.op_type in ("Einsum", "Gemm", "Sin", "Cos", "And") for n in graph.node)
    for value in list(graph.input) + list(graph.output):
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name
    # Whole on HTP with CPU fallback disabled (creation raises otherwise); the EPContext model too.
    ctx_path = str(tmp_path / qnn.CONTEXT_FILE)
    session = qnn.qnn_session(written["paths"]["model"], context_path=ctx_path)
    assert {n.op_type for n in onnx.load(ctx_path).graph.node} == {"EPContext"}
    prologue = written["paths"].get("prologue")
    htp = qnn.QnnModel(session, prologue)
    cpu = qnn.QnnModel(qnn.cpu_session(written["paths"]["model"]), prologue)
    ctx = qnn.QnnModel(qnn.qnn_session(ctx_path), prologue)
    kwargs, feeds = _family_feeds(family, config, seed=11)  # held out: neither traced nor calibrated on
    got = htp(feeds)
    assert qnn.rel_diff(ctx(feeds), got) <= qnn.TOL_CONTEXT
    ref = frozen_output(fraqat_jax.freeze(static_view(model)), kwargs)
    vs_cpu, vs_jax, form = qnn.rel_diff(got, cpu(feeds)), qnn.rel_diff(got, ref), qnn.rel_diff(cpu(feeds), ref)
    print(f"{family}: {len(graph.node)} nodes whole on QNN HTP; vs onnxruntime CPU {vs_cpu:.2e}, vs JAX "
          f"{vs_jax:.2e} (onnxruntime CPU vs JAX {form:.2e})")
    # The agreement (measured 0.9-1.2e-2 and 1.0-1.5e-2 on this input; docs/deploy.md).
    assert vs_cpu <= qnn.TOL_ORT
    assert vs_jax <= qnn.TOL_STUDENT


@pytest.fixture(scope="module")
def default_static_run(tmp_path_factory):
    """The built-in default (digits DiT teacher, W4A8 FraQAT) trained a few steps with static
    activation ranges: the phone model of the issue."""
    from fraqat_jax import train

    workdir = str(tmp_path_factory.mktemp("default_static") / "run")
    train.run({"steps": 2, "batch_size": 8, "sample_grids": False, "progress": "none", "warmup_steps": 1,
               "act_ranges": "static"}, workdir=workdir)
    return workdir


@pytest.fixture(scope="module")
def default_qnn_export(default_static_run, tmp_path_factory):
    """``export --format qnn`` of the default run: ``(folder, report, printed)`` (shared by the
    export's checks and the runner's, tests/test_deploy_qnn.py)."""
    import contextlib
    import io

    from fraqat_jax import export
    from fraqat_jax.export import orbax

    def no_round_trip(*args, **kwargs):
        raise AssertionError("the QNN export builds its JAX reference in memory, not through an orbax folder")

    out = tmp_path_factory.mktemp("default_qnn") / "qnn"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(orbax, "export_orbax", no_round_trip)
        mp.setattr(orbax, "load", no_round_trip)
        report = export.main(["--workdir", default_static_run, "--out", str(out), "--format", "qnn",
                              "--calibration-samples", "16"])
    return out, report, printed.getvalue()


@pytest.mark.slow
def test_default_run_exports_whole_to_qnn_htp_from_the_command_line(default_qnn_export):
    out, report, printed = default_qnn_export
    assert "all" in printed and "PSNR" in printed
    saved = json.loads((out / "qnn.json").read_text())
    assert list(saved) == ["soc", "htp_arch", "nodes", "nodes_on_qnn", "max_rel_diff_ort", "max_rel_diff_student",
                           "context_bytes", "weight_bytes"]
    assert saved["soc"] == "sm8750" and saved["htp_arch"] == 79
    assert saved["nodes"] == saved["nodes_on_qnn"] == len(onnx.load(str(out / "model.onnx")).graph.node)
    assert saved["max_rel_diff_ort"] <= qnn.TOL_ORT and saved["max_rel_diff_student"] <= qnn.TOL_STUDENT
    assert report["max_rel_diff_context"] <= qnn.TOL_CONTEXT and report["psnr_sampling"] > 25
    # A session built as the issue builds it (HTP, SM8750 / v79, CPU fallback disabled) takes
    # model.onnx whole and the EPContext model loads without compiling: only EPContext nodes.
    qnn.qnn_session(str(out / "model.onnx"))
    ctx = onnx.load(str(out / "model_ctx.onnx"))
    assert {n.op_type for n in ctx.graph.node} == {"EPContext"}
    assert 0 < saved["context_bytes"] <= os.path.getsize(out / "model_ctx.onnx")
    # INT4 codes: a quarter of the quantized kernels in bf16, plus the scales.
    assert saved["weight_bytes"] < 0.3 * report["weight_bytes_bf16"]
    print(qnn.summary(report))


def test_bad_input_exits_2(tmp_path, capsys, monkeypatch):
    """Checked before the run is read (``--workdir`` need not hold one)."""
    from fraqat_jax import export

    default_static_run = str(tmp_path)

    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", default_static_run, "--out", str(tmp_path / "a"), "--format", "qnn", "--soc", "sm9999"])
    assert e.value.code == 2 and "sm9999" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", default_static_run, "--out", str(tmp_path / "b"), "--format", "qnn",
                     "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", default_static_run, "--out", str(tmp_path / "b"), "--format", "qnn",
                     "--product-bits", "12"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--product-bits" in err and "12" in err and "16 or 8" in err
    # Without onnxruntime-qnn: exit 2 naming the extra that installs it.
    import builtins

    real_import = builtins.__import__

    def no_qnn(name, *args, **kwargs):
        if name == "onnxruntime_qnn":
            raise ImportError("No module named 'onnxruntime_qnn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_qnn)
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", default_static_run, "--out", str(tmp_path / "c"), "--format", "qnn"])
    assert e.value.code == 2 and "pip install 'fraqat_jax[qnn]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pipeline.json and the runner


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)  # peak to peak 2: images in [-1, 1]


@pytest.mark.slow
def test_default_folder_runs_through_the_deploy_command_with_labels(default_static_run, default_qnn_export, tmp_path,
                                                                    capsys):
    """The digits default's folder keeps today's layout and gains pipeline.json; ``python -m
    fraqat_jax.deploy --label K`` makes digits the shipped classifier recognises, on QNN HTP as on
    the JAX student (same frozen quantization, noise and sampler), and QNN agrees with the CPU."""
    from flax import nnx

    from fraqat_jax import deploy, runs
    from fraqat_jax.diffusion import model_sampler
    from fraqat_jax.eval.classifier import DigitsClassifier

    out, _, printed = default_qnn_export
    assert {"model.onnx", "model_ctx.onnx", "qnn.json", "pipeline.json"} <= set(os.listdir(out))
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["kind"] == "image" and manifest["conditioning"] == "label"
    assert manifest["label"] == {"input": "class_labels", "num_classes": 10, "null": 10}
    assert manifest["sampler"]["name"] == "ddim" and manifest["soc"]["htp_arch"] == 79
    names = [i["name"] for i in manifest["components"]["transformer"]["inputs"]]
    assert set(names) == {"timestep", "hidden_states", "class_labels"}
    # 3 DDIM steps with guidance: the JAX student draws all ten digits; five of them keep the HTP
    # simulator's share of the suite small (30 calls).
    steps, guidance, labels = 3, 2.0, [0, 2, 4, 6, 8]
    qnn_imgs, cpu_imgs = [], []
    for k in labels:
        qnn_imgs.append(deploy.main([str(out), "--label", str(k), "--out", str(tmp_path / f"q{k}.png"), "--seed", str(k),
                                     "--steps", str(steps), "--guidance", str(guidance)]))
        cpu_imgs.append(deploy.main([str(out), "--label", str(k), "--out", str(tmp_path / f"c{k}.png"), "--seed", str(k),
                                     "--steps", str(steps), "--guidance", str(guidance), "--provider", "cpu"]))
    assert "transformer:" in capsys.readouterr().out
    # The JAX student, frozen as exported, from the runner's noise.
    _, student, _ = runs.load_run(default_static_run, unscan=True, attention="xla")
    frozen = fraqat_jax.freeze(static_view(student))
    graphdef, state = nnx.split(frozen)
    sampler = model_sampler(lambda st: nnx.merge(graphdef, st), "dit", num_steps=steps, guidance_scale=guidance)
    noise = np.stack([np.random.default_rng(k).standard_normal((1, 8, 8)).astype(np.float32) for k in labels])
    ref = np.asarray(sampler(state, noise, {"class_labels": np.asarray(labels, np.int32)}, jax.random.key(0),
                             {"class_labels": np.int32(10)}))
    qnn_imgs, cpu_imgs = np.stack(qnn_imgs), np.stack(cpu_imgs)
    psnr_jax = min(_psnr(q, r) for q, r in zip(qnn_imgs, ref))
    psnr_cpu = min(_psnr(q, c) for q, c in zip(qnn_imgs, cpu_imgs))
    clf = DigitsClassifier.load()
    acc_qnn, acc_jax = clf.accuracy(qnn_imgs, np.asarray(labels)), clf.accuracy(ref, np.asarray(labels))
    print(f"digits default via deploy: PSNR QNN vs JAX {psnr_jax:.1f} dB, QNN vs CPU {psnr_cpu:.1f} dB; "
          f"classifier accuracy QNN {acc_qnn:.2f}, JAX {acc_jax:.2f}")
    assert psnr_jax >= 30 and psnr_cpu >= 25
    assert acc_qnn >= 0.8 and abs(acc_qnn - acc_jax) <= 0.2  # at most one of the five apart
