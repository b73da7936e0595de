"""The QNN HTP form of a language model: prefill and decode graphs with a host-side KV cache
(``export/qnn_text.py``, ``text/kv_step.py``) and the host runner ``python -m fraqat_jax.deploy``
(``deploy/text.py``), checked against the JAX frozen student's full forward (no cache), greedy.

One generation folder per module, exported at the default lengths of the shipped ``builtin:lm``
(context 256, prefill 128) from a W4A8 student with static ranges; the QNN simulator is slow, so
HTP runs few steps and the long checks run the same graphs on the CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_qnn")

import jax.numpy as jnp  # noqa: E402

import fraqat_jax  # noqa: E402
from fraqat_jax.data.text import load_tokenizer  # noqa: E402
from fraqat_jax.deploy import text as deploy_text  # noqa: E402
from fraqat_jax.deploy.__main__ import main as deploy_main  # noqa: E402
from fraqat_jax.export import qnn_text  # noqa: E402
from fraqat_jax.export.onnx import static_view  # noqa: E402
from fraqat_jax.models import from_transformers  # noqa: E402
from fraqat_jax.text import builtin_teacher_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEACHER = builtin_teacher_dir()
TOL = qnn_text.TOL_LOGITS


def _windows(tok, n, length):
    docs = [json.loads(line)["text"] for line in open(os.path.join(TEACHER, "heldout.jsonl"), encoding="utf-8")]
    ids = [i for d in docs for i in tok.encode(d).ids[1:]]  # one stream, each window starting with <bos>
    return [[2] + ids[k * length:(k + 1) * length - 1] for k in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A W4A8 student of builtin:lm (static ranges calibrated on held-out text) and its folder."""
    tok = load_tokenizer(TEACHER)
    model = from_transformers(TEACHER)
    fraqat_jax.quantize_model(model, fraqat_jax.Rule(r".*", weight_bits=4, act_bits=8, layer_types=("Linear",)))
    calib = _windows(tok, 14, 128)
    fraqat_jax.calibrate(model, [{"input_ids": jnp.asarray(calib[:8])}])
    out = str(tmp_path_factory.mktemp("gen"))
    report = qnn_text.export_text_qnn(model, out, tokenizer_from=TEACHER, calibration_windows=calib[8:10],
                                      heldout_windows=[], log=lambda *_: None)
    frozen = fraqat_jax.freeze(static_view(model))
    return {"dir": out, "report": report, "frozen": frozen, "tok": tok, "held": _windows(tok, 24, 200)[14:]}


def _model(folder, provider):
    manifest = json.load(open(os.path.join(folder, "pipeline.json")))
    return deploy_text.TextModel(manifest["model"], *deploy_text.open_graphs(manifest, folder, provider))


def _compare(got, ref_tokens, ref_logits):
    """(leading equal tokens, max |logits - ref| / max|ref| until the first differing token)."""
    same = 0
    while same < min(len(got["tokens"]), len(ref_tokens)) and got["tokens"][same] == ref_tokens[same]:
        same += 1
    steps = min(same + 1, len(got["logits"]), len(ref_logits))
    err = np.abs(got["logits"][:steps] - ref_logits[:steps]).max() / np.abs(ref_logits[:steps]).max()
    return same, float(err)


def test_the_folder_holds_both_graphs_whole_on_htp_sharing_one_context(exported):
    rep, folder = exported["report"], exported["dir"]
    assert rep["ok"] and not rep.get("refused")  # compiled with CPU fallback disabled
    manifest = json.load(open(os.path.join(folder, "pipeline.json")))
    assert manifest["kind"] == "text" and manifest["model"]["context_len"] == 256
    assert manifest["model"]["prefill_len"] == 128 and manifest["model"]["sliding_window"] == 64
    for name, n in (("prefill", 128), ("decode", 1)):
        g = onnx.load(os.path.join(folder, manifest["components"][name]["onnx"])).graph
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(g.input) + list(g.output)}
        assert shapes["input_ids"] == [1, n] and shapes["attention_mask"] == [1, 1, n, 256]
        assert shapes["sliding_attention_mask"] == [1, 1, n, 256] and shapes["position_cos"] == [1, n, 16]
        assert shapes["past_key_3_in"] == [1, 2, 16, 256 - n] and shapes["past_value_3_in"] == [1, 2, 256 - n, 16]
        assert shapes["past_key_0_out"] == [1, 2, 16, n] and shapes["past_value_0_out"] == [1, 2, n, 16]
        assert shapes["logits"] == [1, n, 2048]
        assert {n.op_type for n in g.node} >= {"DequantizeLinear", "QuantizeLinear", "MatMul", "Gather", "Gemm"}
        # The tied embedding / LM head: one table, read by the Gather and (transB) by the Gemm.
        (table,) = [t.name for t in g.initializer if 2048 in t.dims]
        assert {n.op_type for n in g.node if table in n.input} == {"Gather", "Gemm"}
        ctx = onnx.load(os.path.join(folder, manifest["components"][name]["context"])).graph
        assert [n.op_type for n in ctx.node] == ["EPContext"]
        # The CPU graph: each product as the JAX student computes it (exact integer sums times the
        # two scales), without the requantization of its accumulator.
        cpu = onnx.load(os.path.join(folder, manifest["components"][name]["cpu_onnx"])).graph
        products = [n for n in g.node if n.op_type in ("MatMul", "Gemm")
                    and any(i.endswith(".qnn_dq") or "DequantizeLinear" in i for i in n.input)]
        requant = [n.name for n in g.node if n.name.endswith(".out.qnn_q")]
        assert len(requant) == rep["qdq"][name]["products"] == 28 and len(products) >= 28
        assert (rep["qdq"][name]["cpu_exact_products"], rep["qdq"][name]["cpu_float_products"]) == (28, 0)
        assert not [n for n in cpu.node if n.name.endswith((".out.qnn_q", ".out.qnn_dq"))]
        assert len([n for n in cpu.node if n.name.endswith(".exact_sum") and n.op_type == "MatMul"]) == 28
        assert "QuantizeLinear" not in {n.op_type for n in cpu.node}
        def codes(graph):  # the INT4 / INT8 weight codes (the CPU graph drops their zero points, all 0)
            return {(t.name, t.raw_data) for t in graph.initializer if "kernel_codes" in t.name
                    and t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)}
        assert len(codes(g)) == 28 and codes(cpu) == codes(g)
    # One context binary for both graphs, no larger than 1.2x one graph compiled alone.
    assert len(rep["context_files"]) == 1 and os.path.isfile(os.path.join(folder, rep["context_files"][0]))
    assert rep["context_bytes"] <= 1.2 * max(rep["context_bytes_alone"].values())
    assert rep["context_bytes"] < 0.8 * sum(rep["context_bytes_alone"].values())
    for f in ("tokenizer.json", "generation_config.json", "qnn.json"):
        assert os.path.isfile(os.path.join(folder, f))


def test_htp_decode_follows_the_jax_student(exported):
    """The decode graph on QNN HTP after a CPU prefill (a 128-token prefill call is slow on the
    simulator: its HTP run is the export command's own check): greedy tokens and logits against
    the JAX frozen student."""
    folder, frozen = exported["dir"], exported["frozen"]
    manifest = json.load(open(os.path.join(folder, "pipeline.json")))
    (prefill_cpu, _), (_, decode_htp) = (deploy_text.open_graphs(manifest, folder, p) for p in ("cpu", "qnn"))
    model = deploy_text.TextModel(manifest["model"], prefill_cpu, decode_htp)
    prompt = exported["held"][0][:20]
    ref_tokens, ref_logits = qnn_text.jax_greedy(frozen, prompt, 4, 256)
    got = deploy_text.generate(model, prompt, max_new_tokens=4, keep_logits=True)
    same, err = _compare(got, ref_tokens, ref_logits)
    assert err <= TOL and same == 4, (same, err)


def test_cpu_greedy_tokens_equal_the_jax_student_on_held_out_prompts(exported):
    """10 held-out prompts, 32 new tokens: the QNN-form graphs on onnxruntime's CPU against the JAX
    frozen student (the port's full forward over the growing sequence)."""
    model, frozen = _model(exported["dir"], "cpu"), exported["frozen"]
    equal = 0
    for ids in exported["held"]:
        prompt = ids[:16]
        ref_tokens, ref_logits = qnn_text.jax_greedy(frozen, prompt, 32, 256)
        got = deploy_text.generate(model, prompt, max_new_tokens=32, keep_logits=True)
        same, err = _compare(got, ref_tokens, ref_logits)
        assert err <= TOL, (same, err)
        equal += got["tokens"] == ref_tokens
    assert equal >= 8


def test_a_prompt_of_two_chunks_and_tokens_past_the_sliding_window(exported):
    """150 prompt tokens (two prefill chunks of 128, the second ending at the prompt's end) and 24
    new ones: the full-attention layers see position 0 and the sliding layers only the last 64."""
    model, frozen = _model(exported["dir"], "cpu"), exported["frozen"]
    prompt = exported["held"][0][:150]
    ref_tokens, ref_logits = qnn_text.jax_greedy(frozen, prompt, 24, 256)
    logits = model.prefill(prompt)
    full = np.asarray(frozen(jnp.asarray([prompt])), np.float32)[0]
    assert np.abs(logits - full).max() <= TOL * np.abs(full).max()
    got = deploy_text.generate(model, prompt, max_new_tokens=24, keep_logits=True)
    same, err = _compare(got, ref_tokens, ref_logits)
    assert err <= TOL and same >= 16, (same, err)
    # Without the window the sliding layers would see every position: the logits move.
    manifest = json.load(open(os.path.join(exported["dir"], "pipeline.json")))
    wide = deploy_text.TextModel({**manifest["model"], "sliding_window": 10**6},
                                 *deploy_text.open_graphs(manifest, exported["dir"], "cpu"))
    assert np.abs(wide.prefill(prompt)[-1] - full[-1]).max() > 10 * np.abs(logits[-1] - full[-1]).max()


def test_the_command_line_writes_the_continuation_as_generate_does(exported, tmp_path, capsys):
    """``--out`` holds what the runner's API generates: the continuation only, special tokens
    skipped (its tokens against JAX's: the tests above)."""
    tok = exported["tok"]
    text = tok.decode(exported["held"][1][1:12])
    ids = tok.encode(text).ids
    ref_tokens = deploy_text.generate(_model(exported["dir"], "cpu"), ids, max_new_tokens=12, eos_ids=[1])["tokens"]
    out = tmp_path / "out.jsonl"
    deploy_main([exported["dir"], "--prompt", text, "--max-new-tokens", "12", "--provider", "cpu", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row == {"prompt": text, "text": tok.decode(ref_tokens, skip_special_tokens=True), "tokens": len(ref_tokens)}
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "x " * 300], "longer than the context"),
    (["--prompt", "def f():", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_input_exits_2_with_one_line(exported, argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        deploy_main([exported["dir"], *argv, "--provider", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0]


def test_a_folder_that_is_not_a_generation_folder_exits_2(tmp_path, capsys):
    (tmp_path / "pipeline.json").write_text(json.dumps({"kind": "text", "components": {}}))
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            deploy_main([str(folder), "--prompt", "x", "--provider", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1


def test_sampling_draws_within_top_k_and_is_reproducible():
    rng = np.random.default_rng(0)
    logits = np.asarray([0.0, 5.0, 4.0, -1.0, 4.5])
    assert deploy_text.next_token(logits, rng) == 1
    draws = [deploy_text.next_token(logits, np.random.default_rng(s), temperature=1.0, top_k=2) for s in range(40)]
    assert set(draws) == {1, 4}
    again = [deploy_text.next_token(logits, np.random.default_rng(s), temperature=1.0, top_k=2) for s in range(40)]
    assert draws == again
    # top_p: the smallest set holding 0.5 of the mass is the likeliest token alone.
    assert {deploy_text.next_token(logits, np.random.default_rng(s), temperature=1.0, top_p=0.3)
            for s in range(20)} == {1}


def test_lengths_default_to_the_model_and_refuse_bad_values(tmp_path, capsys):
    assert qnn_text.lengths({"max_position_embeddings": 256}, None, None) == (128, 256)
    assert qnn_text.lengths({"max_position_embeddings": 8192}, None, None) == (128, 512)
    assert qnn_text.lengths({"max_position_embeddings": 8192}, 64, 4096) == (64, 4096)
    for n, c, flag in ((None, 300, "--context-len"), (256, 256, "--prefill-len"), (0, 64, "--prefill-len")):
        with pytest.raises(ValueError, match=flag):
            qnn_text.lengths({"max_position_embeddings": 256}, n, c)
    from fraqat_jax.export.__main__ import main as export_main

    with pytest.raises(SystemExit) as e:
        export_main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "orbax", "--prefill-len", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--prefill-len" in err[0]


def test_the_agreement_benchmark_counts_what_the_runner_and_jax_give(exported):
    """``benchmarks/text_agreement.py`` on three prompts of the CPU graphs: its count of equal
    prompts is the runner's against ``jax_greedy``'s, one teacher-forced step per new token, and its
    interval is Wilson's (closed form at the edges, and the 38-of-40 figure docs/deploy.md quotes)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "text_agreement.py")
    spec = importlib.util.spec_from_file_location("_bench_text_agreement", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    frozen, folder = exported["frozen"], exported["dir"]
    prompts = [ids[:16] for ids in exported["held"][:3]]
    got = bench.agreement(frozen, folder, prompts, 8, "cpu")
    want = sum(deploy_text.generate(_model(folder, "cpu"), p, max_new_tokens=8)["tokens"]
               == qnn_text.jax_greedy(frozen, p, 8, 256)[0] for p in prompts)
    assert (got["prompts"], got["equal"], got["steps"]) == (3, want, 24)
    assert got["argmax_differs"] <= got["steps_moved"] <= got["steps"]
    assert got["wilson95"][0] <= want / 3 <= got["wilson95"][1]
    assert bench.wilson(0, 10)[0] == 0.0 and bench.wilson(10, 10)[1] == 1.0
    assert bench.wilson(38, 40) == pytest.approx([0.8350, 0.9862], abs=1e-4)
    texts = bench.held_out_prompts(os.path.join(TEACHER, "heldout.jsonl"), 5)
    assert len(texts) == 5 and all(len(t) >= 24 for t in texts)
