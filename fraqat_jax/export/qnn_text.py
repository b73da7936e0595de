"""QNN HTP form of a language-model run: a generation folder with a prefill and a decode graph
sharing one KV-cache layout and one context binary.

``python -m fraqat_jax.export --workdir RUN --out DIR --format qnn [--soc sm8750] [--prefill-len N]
[--context-len C] [--product-bits 16|8]`` on a text run writes into ``DIR``:

* ``prefill.onnx`` (``N`` new tokens, default 128) and ``decode.onnx`` (1 token), both at context
  length ``C`` (default ``min(512, max_position_embeddings)``): the student's cached step (the
  family's ``cached_step``; for Gemma-2 ``fraqat_jax.text.kv_step``: inputs ``input_ids``, the
  additive masks ``[1, 1, N, C]``, the rotary tables, per layer ``past_key_{l}_in`` /
  ``past_value_{l}_in`` holding ``C - N`` cache slots; outputs ``logits`` and the ``N`` new
  keys / values per layer) in the QNN form of :mod:`fraqat_jax.export.qnn` (every rule there
  holds; the product ranges are calibrated on the steps the host runner takes over held-out text);
* ``prefill_cpu.onnx`` and ``decode_cpu.onnx``: the same graphs for ``--provider cpu``, each
  quantized product written as the frozen JAX student computes it
  (:func:`fraqat_jax.export.cpu_graph.exact_products`: exact integer sums of the activation and INT4
  codes times the two scales, without the requantization of the accumulator to the 16- or 8-bit
  output grid that HTP's integer kernels need): for the same activation codes its products are the
  JAX student's bits; the float ops between them agree to float32 rounding;
* ``prefill_ctx.onnx`` and ``decode_ctx.onnx``: their EPContext models for ``--soc``, compiled in
  one weight-sharing group (``ep.share_ep_contexts``), so both point to one context binary
  (``prefill_ctx_qnn.bin``) that holds the weights once;
* ``tokenizer.json`` (and the teacher's other tokenizer files), ``generation_config.json``;
* ``pipeline.json`` (``"kind": "text"``): the graphs, their inputs and outputs, the cache geometry
  and the special tokens, which ``python -m fraqat_jax.deploy DIR --prompt ...`` reads;
* ``qnn.json``: the context sizes (shared, and each graph compiled alone), the agreement figures.

The linear layers of the blocks run as trained: INT4 weights, the trained uint8 activation grid
carried in uint16 (``--product-bits 16``) or the uint8 grid itself (``8``). The tied embedding
(a ``Gather``) and the LM head (a ``MatMul`` by the same table) run in the graph in float, which
HTP executes in fp16, from one initializer: the logits need no host matmul, and the table costs
2 bytes per parameter in the context.

The simulator (the wheel's x86-64 ``libQnnHtp.so``) compiles a weight-sharing group but cannot load
the shared binary back (``contextCreateFromBinary``: not supported); on it the runner and the
agreement checks compile the ONNX graphs on HTP (CPU fallback disabled) instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from fraqat_jax.deploy.text import TextModel, generate, session_fn, step_tables
from fraqat_jax.export.cpu_graph import exact_products
from fraqat_jax.export.qnn import (DEFAULT_SOC, PRODUCT_BITS, context_bytes, cpu_session, qnn_module,
                                   qnn_session, refused_nodes, soc_of)
from fraqat_jax.export.qnn_graph import to_qnn

__all__ = ["DEFAULT_CONTEXT", "DEFAULT_PREFILL", "GRAPHS", "TOL_LOGITS", "export_text_qnn", "jax_greedy",
           "shared_context_sessions", "summary"]

DEFAULT_PREFILL = 128
DEFAULT_CONTEXT = 512  # at most max_position_embeddings
GRAPHS = ("prefill", "decode")
TOL_LOGITS = 5e-2  # QNN vs the JAX frozen student, x max|logits|, until the first differing token
FILES = {"prefill": ("prefill.onnx", "prefill_ctx.onnx"), "decode": ("decode.onnx", "decode_ctx.onnx")}
CPU_FILES = {"prefill": "prefill_cpu.onnx", "decode": "decode_cpu.onnx"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def lengths(config: Mapping, prefill_len: int | None, context_len: int | None) -> tuple[int, int]:
    """``(prefill_len, context_len)`` with their defaults; ValueError naming a bad one."""
    limit = int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
    c = min(DEFAULT_CONTEXT, limit) if context_len is None else context_len
    if not isinstance(c, (int, np.integer)) or not 2 <= c <= limit:
        raise ValueError(f"--context-len must be an integer in [2, {limit}] (max_position_embeddings), got {c!r}")
    n = min(DEFAULT_PREFILL, c - 1) if prefill_len is None else prefill_len
    if not isinstance(n, (int, np.integer)) or not 1 <= n < c:
        raise ValueError(f"--prefill-len must be an integer in [1, {c - 1}] (below --context-len {c}), got {n!r}")
    return int(n), int(c)


def _example(geom: Mapping, n: int, c: int) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.zeros((1, n), np.int32),
             **step_tables(0, n, c, window=geom["sliding_window"], dim=geom["head_dim"], theta=geom["rope_theta"])}
    for i in range(geom["layers"]):
        feeds[f"past_key_{i}_in"] = np.zeros((1, geom["kv_heads"], geom["head_dim"], c - n), np.float32)
        feeds[f"past_value_{i}_in"] = np.zeros((1, geom["kv_heads"], c - n, geom["head_dim"]), np.float32)
    return feeds


def tie_lm_head(model) -> int:
    """The tied LM head reads the embedding table itself: a ``MatMul`` by a constant that is the
    transpose of a ``Gather`` table (the converter folds ``table.T`` into a second initializer)
    becomes ``Reshape -> Gemm(transB=1) -> Reshape`` on the table, so the graph, and the HTP
    context, store it once. Returns the number of rewritten heads."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    tables = {n.input[0]: numpy_helper.to_array(inits[n.input[0]]) for n in g.node
              if n.op_type == "Gather" and n.input[0] in inits}
    count = 0
    for n in [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]:
        w = numpy_helper.to_array(inits[n.input[1]])
        table = next((name for name, t in tables.items() if w.ndim == 2 and t.shape == w.shape[::-1]
                      and np.array_equal(t.T, w)), None)
        if table is None:
            continue
        hidden, vocab = w.shape
        index = list(g.node).index(n)
        x, y, tag = n.input[0], n.output[0], n.name or n.output[0]
        shape_in, shape_out, flat, prod = (f"{tag}_tied_{k}" for k in ("shape_in", "shape_out", "flat", "gemm"))
        g.initializer.extend([numpy_helper.from_array(np.asarray([-1, hidden], np.int64), shape_in),
                              numpy_helper.from_array(np.asarray([1, -1, vocab], np.int64), shape_out)])
        g.node.remove(n)
        for j, node in enumerate([helper.make_node("Reshape", [x, shape_in], [flat], name=flat),
                                  helper.make_node("Gemm", [flat, table], [prod], transB=1, name=prod),
                                  helper.make_node("Reshape", [prod, shape_out], [y], name=f"{tag}_tied_out")]):
            g.node.insert(index + j, node)
        count += 1
    used = {i for node in g.node for i in node.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return count


def calibration_steps(geom: Mapping, fns: Mapping, windows: Sequence[Sequence[int]], prompt_len: int | None = None) -> dict:
    """The feeds of every step the host runner takes over ``windows`` (token ids): the first
    ``prompt_len`` tokens (default: half the window) prefilled, the rest decoded one by one
    (teacher-forced)."""
    record: dict[str, list] = {"prefill": [], "decode": []}
    model = TextModel(geom, fns["prefill"], fns["decode"], record=record)
    for ids in windows:
        ids = [int(t) for t in ids][:geom["context_len"]]
        p = max(1, min(len(ids) // 2 if prompt_len is None else prompt_len, len(ids) - 1))
        model.prefill(ids[:p])
        for t in ids[p:]:
            model.decode(t)
    return record


def jax_greedy(frozen, prompt_ids, num_new: int, context: int, eos_ids=()) -> tuple[list[int], np.ndarray]:
    """The frozen JAX student's greedy continuation (its full forward over the growing sequence, no
    cache) and the logits of each step ``[steps, vocab]``; stops at an ``eos_ids`` token."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(frozen)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    p = len(prompt_ids)
    buf = np.zeros((1, min(context, p + num_new)), np.int32)  # causal: the positions after p + i change nothing
    buf[0, :p] = prompt_ids
    tokens, logits = [], []
    for i in range(min(num_new, context - p)):
        row = np.asarray(forward(state, jnp.asarray(buf)), np.float32)[0, p + i - 1]
        logits.append(row)
        token = int(np.argmax(row))
        if token in set(eos_ids):
            break
        tokens.append(token)
        if p + i < buf.shape[1]:
            buf[0, p + i] = token
    return tokens, np.stack(logits)


def shared_context_sessions(paths: Mapping[str, str], ctx_paths: Mapping[str, str], soc: str) -> dict:
    """Compiles the graphs on HTP (CPU fallback disabled) in one weight-sharing group, writing their
    EPContext models (context binary beside them, ``embed_mode`` 0); returns the sessions."""
    import onnxruntime as ort

    from fraqat_jax.deploy.common import htp_options

    qnn_module()
    chip = soc_of(soc)
    sessions = {}
    for i, name in enumerate(GRAPHS):
        options = htp_options({"soc_model": chip.soc_model, "htp_arch": chip.htp_arch})
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_embed_mode", "0")
        options.add_session_config_entry("ep.context_file_path", ctx_paths[name])
        options.add_session_config_entry("ep.share_ep_contexts", "1")
        if i == len(GRAPHS) - 1:
            options.add_session_config_entry("ep.stop_share_ep_contexts", "1")
        sessions[name] = ort.InferenceSession(paths[name], options)
    return sessions


def _context_files(ctx_path: str) -> list[str]:
    """The context binary files an EPContext model (``embed_mode`` 0) points to."""
    import onnx

    return [next(a.s for a in n.attribute if a.name == "ep_cache_context").decode()
            for n in onnx.load(ctx_path).graph.node if n.op_type == "EPContext"]


def _io(session_or_model) -> tuple[list, list]:
    from onnx import helper

    g = session_or_model.graph

    def entry(v):
        t = v.type.tensor_type
        return {"name": v.name, "shape": [d.dim_value for d in t.shape.dim],
                "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return [entry(v) for v in g.input], [entry(v) for v in g.output]


def _copy_tokenizer(folder: str | None, out_dir: str, config: Mapping) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(folder, name) if folder else ""
        if folder and os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    if "generation_config.json" not in copied:
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
            f.write("\n")
    return copied


def export_text_qnn(student, out_dir: str, *, tokenizer_from: str | None, calibration_windows: Sequence[Sequence[int]],
                    heldout_windows: Sequence[Sequence[int]], soc: str = DEFAULT_SOC, product_bits: int = PRODUCT_BITS[0],
                    prefill_len: int | None = None, context_len: int | None = None, check_tokens: int = 32,
                    check_prompt_len: int = 16, htp_prompts: int = 2, htp_tokens: int = 8, log=print) -> dict:
    """Writes the generation folder (see the module doc) for ``student`` (a quantized causal LM with
    static input ranges); returns the report. ``calibration_windows`` / ``heldout_windows``: token
    ids of held-out text: the first for the product ranges, the second for the agreement (their
    first ``check_prompt_len`` tokens as prompts, ``check_tokens`` greedy tokens each on the CPU;
    the first ``htp_prompts`` of them with ``htp_tokens`` tokens on HTP)."""
    import onnx

    import fraqat_jax
    from fraqat_jax.export import onnx as eo
    from fraqat_jax.family import family_for_model

    qnn_module()
    chip = soc_of(soc)
    if product_bits not in PRODUCT_BITS:
        raise ValueError(f"--product-bits must be one of {', '.join(map(str, PRODUCT_BITS))}, got {product_bits!r}")
    config = dict(student.config)
    n, c = lengths(config, prefill_len, context_len)
    model = eo.static_view(student)
    step = family_for_model(student).cached_step(model)
    geom = {**step.geometry(), "prefill_len": n, "context_len": c}
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name):
        stages[name] = round(time.perf_counter() - start - sum(stages.values()), 2)

    frozen = fraqat_jax.freeze(model)
    frozen_step = fraqat_jax.freeze(step, unpack=False)  # the same codes, named by the step's paths
    protos, weight_outputs, counts = {}, {}, {}
    for name, tokens in (("prefill", n), ("decode", 1)):
        qdq = eo.to_onnx(step, _example(geom, tokens, c), frozen=frozen_step, batch_size=1)
        protos[name], counts[name], weight_outputs[name] = qdq.proto, qdq.counts, qdq.weight_outputs
        counts[name]["tied_lm_head"] = tie_lm_head(protos[name])
    lap("onnx")
    raw = {k: session_fn(cpu_session(p.SerializeToString())) for k, p in protos.items()}
    record = calibration_steps(geom, raw, calibration_windows)
    paths = {k: os.path.join(out_dir, FILES[k][0]) for k in GRAPHS}
    ctx_paths = {k: os.path.join(out_dir, FILES[k][1]) for k in GRAPHS}
    cpu_paths = {k: os.path.join(out_dir, CPU_FILES[k]) for k in GRAPHS}
    qcounts = {}
    for name in GRAPHS:
        main, prologue, qcounts[name] = to_qnn(protos[name], weight_outputs[name], record[name], product_bits)
        if prologue is not None:
            raise eo.OnnxExportError("the cached step computes sin/cos; the host gives them")
        for p in (paths[name], ctx_paths[name], ctx_paths[name][:-len(".onnx")] + "_qnn.bin"):
            if os.path.exists(p):
                os.remove(p)
        onnx.save(main, paths[name])
        onnx.checker.check_model(paths[name], full_check=True)
        cpu_model, qcounts[name]["cpu_exact_products"], qcounts[name]["cpu_float_products"] = exact_products(main)
        onnx.save(cpu_model, cpu_paths[name])
    lap("qnn_form")
    report: dict[str, Any] = {"soc": chip.name, "htp_arch": chip.htp_arch, "soc_model": chip.soc_model,
                              "product_bits": int(product_bits), "prefill_len": n, "context_len": c,
                              "nodes": {k: len(onnx.load(paths[k]).graph.node) for k in GRAPHS},
                              "weight_bytes": int(counts["prefill"]["weight_bytes"]),
                              "initializer_bytes": sum(len(t.raw_data) or t.ByteSize()
                                                       for t in onnx.load(paths["prefill"]).graph.initializer),
                              "tied_lm_head": counts["prefill"]["tied_lm_head"],
                              "bf16_bytes": int(counts["prefill"]["bf16_bytes"]), "qdq": qcounts}
    log(f"wrote {paths['prefill']} ({n} tokens) and {paths['decode']} (1 token) at context {c}: "
        f"{report['nodes']['prefill']} / {report['nodes']['decode']} nodes, {qcounts['prefill'].get('products', 0)} "
        f"QDQ products each ({product_bits}-bit outputs)")
    try:
        t0 = time.perf_counter()
        sessions = shared_context_sessions(paths, ctx_paths, chip.name)
        report["context_build_seconds"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types)
        with tempfile.TemporaryDirectory() as scratch:
            refused = {k: refused_nodes(paths[k], chip.name, scratch) for k in GRAPHS}
        report.update(ok=False, refused=refused, error=str(e).splitlines()[0][:300])
        _write_json(os.path.join(out_dir, "qnn.json"), report)
        return report
    bins = sorted({b for k in GRAPHS for b in _context_files(ctx_paths[k])})
    report["context_files"] = bins
    report["context_bytes"] = sum(os.path.getsize(os.path.join(out_dir, b)) for b in bins)
    lap("htp_shared")
    report["context_bytes_alone"] = alone = _alone_sizes(paths, chip.name)
    report["context_ratio_vs_one_graph"] = report["context_bytes"] / max(alone.values())
    lap("htp_alone")
    if heldout_windows:
        report.update(_agreement(frozen, geom, sessions, paths, cpu_paths, heldout_windows, check_prompt_len, check_tokens,
                                 _eos(config), htp_prompts, htp_tokens))
    lap("agreement")
    copied = _copy_tokenizer(tokenizer_from, out_dir, config)
    manifest = _manifest(geom, config, chip, paths, ctx_paths, cpu_paths, product_bits, copied)
    with open(os.path.join(out_dir, "pipeline.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    report["stage_seconds"] = stages
    report["export_seconds"] = round(time.perf_counter() - start, 2)
    report["ok"] = max(report.get(k, 0.0) for k in ("max_rel_diff_logits", "max_rel_diff_logits_cpu",
                                                    "max_rel_diff_logits_qnn_form_cpu")) <= TOL_LOGITS
    _write_json(os.path.join(out_dir, "qnn.json"), report)
    return report


def _alone_sizes(paths: Mapping[str, str], soc: str) -> dict[str, int]:
    """Context binary bytes of each graph compiled alone (what sharing saves)."""
    alone = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in GRAPHS:
            path = os.path.join(scratch, f"{name}_ctx.onnx")
            qnn_session(paths[name], soc, context_path=path)
            alone[name] = context_bytes(path)
    return alone


def _eos(config: Mapping) -> list[int]:
    e = config.get("eos_token_id")
    return [] if e is None else ([int(e)] if isinstance(e, (int, np.integer)) else [int(x) for x in e])


def _agreement(frozen, geom, sessions, paths, cpu_paths, windows, prompt_len, num_new, eos, htp_prompts, htp_tokens) -> dict:
    """Greedy continuations of held-out prompts against the JAX frozen student's: on onnxruntime's
    CPU for every window, ``num_new`` tokens, both the CPU graphs (``cpu``: what ``--provider cpu``
    runs) and the QNN-form graphs themselves (``qnn_form_cpu``: HTP's arithmetic, emulated in
    float32); on QNN HTP for the first ``htp_prompts``, ``htp_tokens`` tokens (the simulator is
    slow). Tokens equal, and the logits until the first differing token."""
    runners = {"htp": TextModel(geom, session_fn(sessions["prefill"]), session_fn(sessions["decode"])),
               "cpu": TextModel(geom, *(session_fn(cpu_session(cpu_paths[k])) for k in GRAPHS)),
               "qnn_form_cpu": TextModel(geom, *(session_fn(cpu_session(paths[k])) for k in GRAPHS))}
    rows = {k: [] for k in runners}
    worst = {k: 0.0 for k in runners}
    for i, ids in enumerate(windows):
        prompt = [int(t) for t in ids[:prompt_len]]
        ref_tokens, ref_logits = jax_greedy(frozen, prompt, num_new, geom["context_len"], eos)
        for kind, model in runners.items():
            n_new = htp_tokens if kind == "htp" else num_new
            if kind == "htp" and i >= htp_prompts:
                continue
            got = generate(model, prompt, max_new_tokens=n_new, eos_ids=eos, keep_logits=True)
            want = ref_tokens[:n_new]
            same = _agree(got["tokens"], want)
            steps = min(same + 1, len(got["logits"]), len(ref_logits))
            scale = float(np.abs(ref_logits[:steps]).max())
            worst[kind] = max(worst[kind], float(np.abs(got["logits"][:steps] - ref_logits[:steps]).max()) / scale)
            rows[kind].append({"equal_tokens": same, "of": len(want), "equal": got["tokens"] == want,
                               "decode_tokens_per_s": round(got["decode_steps"] / max(got["seconds"]["decode"], 1e-9), 2)})
    return {"agreement": rows, "prompts": len(rows["htp"]), "prompts_equal": sum(r["equal"] for r in rows["htp"]),
            "new_tokens": htp_tokens, "prompts_cpu": len(rows["cpu"]),
            "prompts_equal_cpu": sum(r["equal"] for r in rows["cpu"]), "new_tokens_cpu": num_new,
            "max_rel_diff_logits": worst["htp"], "max_rel_diff_logits_cpu": worst["cpu"],
            "prompts_equal_qnn_form_cpu": sum(r["equal"] for r in rows["qnn_form_cpu"]),
            "max_rel_diff_logits_qnn_form_cpu": worst["qnn_form_cpu"]}


def _agree(a, b) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _manifest(geom, config, chip, paths, ctx_paths, cpu_paths, product_bits, copied) -> dict:
    import onnx

    comps = {}
    for name in GRAPHS:
        inputs, outputs = _io(onnx.load(paths[name], load_external_data=False))
        comps[name] = {"onnx": os.path.basename(paths[name]), "context": os.path.basename(ctx_paths[name]),
                       "cpu_onnx": os.path.basename(cpu_paths[name]),
                       "tokens": geom["prefill_len"] if name == "prefill" else 1, "inputs": inputs, "outputs": outputs,
                       "quantization": {"weights": "int4 (int8 above 4 bits), per channel",
                                        "activations": f"trained uint8 grid, products at {product_bits} bits",
                                        "embedding_and_lm_head": "float (fp16 on HTP), one table"}}
    return {"kind": "text", "format_version": 1, "soc": {"name": chip.name, "soc_model": chip.soc_model,
                                                         "htp_arch": chip.htp_arch},
            "components": comps, "model": geom, "weight_sharing": "ep.share_ep_contexts",
            "tokenizer": "tokenizer.json", "generation_config": "generation_config.json",
            "bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id"), "tokenizer_files": copied}


REPORT_KEYS = ("soc", "htp_arch", "product_bits", "prefill_len", "context_len", "nodes", "weight_bytes",
               "initializer_bytes", "tied_lm_head", "bf16_bytes", "context_bytes", "context_bytes_alone", "context_ratio_vs_one_graph",
               "context_files", "context_build_seconds", "max_rel_diff_logits", "max_rel_diff_logits_cpu",
               "prompts", "prompts_equal", "new_tokens", "prompts_cpu", "prompts_equal_cpu", "new_tokens_cpu",
               "prompts_equal_qnn_form_cpu", "max_rel_diff_logits_qnn_form_cpu",
               "agreement", "refused", "error", "stage_seconds", "export_seconds", "ok")


def _write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump({k: report.get(k) for k in REPORT_KEYS if k in report}, f, indent=2)
        f.write("\n")


def summary(report: dict) -> str:
    """Lines for the command line."""
    if report.get("refused"):
        return f"QNN HTP ({report['soc']}) did not take the graphs whole: {report['refused']} ({report.get('error')})"
    alone = report["context_bytes_alone"]
    lines = [
        f"QNN HTP simulator ({report['soc']}, HTP v{report['htp_arch']}): prefill ({report['prefill_len']} tokens) and "
        f"decode graphs at context {report['context_len']}, all nodes with CPU fallback disabled",
        f"shared context binary {report['context_bytes']} bytes = {report['context_ratio_vs_one_graph']:.3f} x one graph "
        f"alone (prefill {alone['prefill']}, decode {alone['decode']} bytes); INT4/INT8 weights {report['weight_bytes']} bytes"]
    if "prompts" in report:
        lines.append(        f"greedy tokens equal to the JAX frozen student's: QNN HTP {report['prompts_equal']} of {report['prompts']} "
        f"held-out prompts ({report['new_tokens']} tokens), onnxruntime CPU {report['prompts_equal_cpu']} of "
        f"{report['prompts_cpu']} ({report['new_tokens_cpu']} tokens); max |logits - JAX| / max|logits| until the first differing "
        f"token {report['max_rel_diff_logits']:.2e} (tolerance {TOL_LOGITS:g}; CPU {report['max_rel_diff_logits_cpu']:.2e})")
        lines.append(f"the QNN-form graphs on onnxruntime CPU (HTP's requantized products, emulated): "
                     f"{report['prompts_equal_qnn_form_cpu']} of {report['prompts_cpu']}, "
                     f"{report['max_rel_diff_logits_qnn_form_cpu']:.2e}")
    return "\n".join(lines)
