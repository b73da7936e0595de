"""The pipeline folder of ``export --format qnn``: ``pipeline.json`` and the networks it names, so
that ``python -m fraqat_jax.deploy`` (and a phone app) can make an image from the folder alone.

Two layouts, one manifest format (``pipeline.json``, ``"kind": "image"``):

* **one network** (a class-conditional model, e.g. the digits default): today's files at the top
  (``model.onnx``, ``model_ctx.onnx``, ``prologue.onnx``, ``qnn.json``) and ``pipeline.json``
  naming the label input, the sampler and its settings (:func:`write_single_manifest`);
* **text to image**: ``text_encoder/``, ``transformer/`` and ``vae_decoder/``, each with its
  ``model.onnx``, EPContext model, optional prologue and ``qnn.json`` (its agreement figures), the
  tokenizer, the empty prompt's embedding and mask (``constants/``), and ``pipeline.json``
  (:func:`export_image_pipeline`).

Each component entry of the manifest says its files (``onnx``, ``context``, ``prologue``), its
host-facing ``inputs`` and ``outputs`` (name, shape, dtype, and for a quantized graph input its
first quantizer's ``scale``, ``zero_point`` and ``dtype``) and its ``quantization`` (weights and
activations as they run on HTP).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from fraqat_jax.deploy.common import MANIFEST

__all__ = ["COMPONENT_BITS", "FORMAT_VERSION", "MANIFEST", "SUBFOLDERS", "build_component", "component_entry",
           "export_image_pipeline", "io_spec", "jitted", "mask_wheres_as_adds", "prune_dead_nodes", "quantize_after_training",
           "read_json", "soc_entry", "tanh_as_sigmoid", "trajectories", "write_manifest", "write_qnn_with",
           "write_single_manifest"]

FORMAT_VERSION = 1
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}


def _value_spec(value) -> dict:
    t = value.type.tensor_type
    return {"name": value.name, "shape": [int(d.dim_value) for d in t.shape.dim],
            "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))}


def _input_quantization(graph, name: str) -> dict | None:
    """``{scale, zero_point, dtype}`` of the first QuantizeLinear reading graph input ``name``."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == name and n.input[1] in inits:
            scale = numpy_helper.to_array(inits[n.input[1]])
            zero = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else None
            return {"scale": scale.tolist(), "zero_point": None if zero is None else zero.tolist(),
                    "dtype": None if zero is None else str(zero.dtype)}
    return None


def io_spec(model_path: str, prologue_path: str | None = None) -> dict:
    """The host-facing ``inputs`` and ``outputs`` of a component: the prologue's inputs and those of
    ``model.onnx`` the prologue does not compute, and ``model.onnx``'s outputs."""
    import onnx

    main = onnx.load(model_path, load_external_data=False)
    inputs, computed = [], set()
    if prologue_path:
        pro = onnx.load(prologue_path, load_external_data=False)
        inputs = [dict(_value_spec(v), quantization=None) for v in pro.graph.input]
        computed = {o.name for o in pro.graph.output}
    seen = {i["name"] for i in inputs}
    for v in main.graph.input:
        if v.name not in computed and v.name not in seen:
            inputs.append(dict(_value_spec(v), quantization=_input_quantization(main.graph, v.name)))
    return {"inputs": inputs, "outputs": [_value_spec(v) for v in main.graph.output]}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def component_entry(out_dir: str, sub: str, quantization: Mapping[str, Any], files: Mapping[str, str]) -> dict:
    """The manifest entry of the component whose files (``files``: ``onnx``, ``context``,
    ``prologue``, ``report``, names relative to ``out_dir/sub``) exist; ``quantization`` as given."""
    rel = {k: os.path.join(sub, f) if sub else f for k, f in files.items()
           if os.path.isfile(os.path.join(out_dir, sub, f))}
    spec = io_spec(os.path.join(out_dir, rel["onnx"]), os.path.join(out_dir, rel["prologue"]) if "prologue" in rel else None)
    return {**rel, **spec, "quantization": dict(quantization)}


def soc_entry(report: Mapping[str, Any]) -> dict:
    return {"name": report["soc"], "soc_model": int(report["soc_model"]), "htp_arch": int(report["htp_arch"])}


def write_manifest(out_dir: str, manifest: Mapping[str, Any]) -> str:
    """Writes ``out_dir/pipeline.json`` (``kind`` and ``format_version`` first); returns its path."""
    path = os.path.join(out_dir, MANIFEST)
    body = {"kind": manifest.get("kind", "image"), "format_version": FORMAT_VERSION,
            **{k: v for k, v in manifest.items() if k not in ("kind", "format_version")}}
    with open(path, "w") as f:
        json.dump(body, f, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else float(o))
        f.write("\n")
    return path


def write_single_manifest(out_dir: str, report: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """``pipeline.json`` of a one-network folder (today's files at the top): ``settings`` from the
    family (conditioning, label, sampler, latent, transformer_io), the transformer's files and io,
    the SoC from the export ``report``."""
    from fraqat_jax.export.qnn import CONTEXT_FILE, MODEL_FILE, PROLOGUE_FILE, REPORT_FILE

    quantization = {"weights": "int4 (trained W4)", "activations": (
        f"uint8 grid of the trained A8 ranges, products in uint{report['product_bits']}"
        if report["product_bits"] == 16 else "uint8 (A8), uint8 products")}
    entry = component_entry(out_dir, "", quantization, {"onnx": MODEL_FILE, "context": CONTEXT_FILE,
                                                         "prologue": PROLOGUE_FILE, "report": REPORT_FILE})
    return write_manifest(out_dir, {"kind": "image", "soc": soc_entry(report), **settings,
                                    "components": {"transformer": entry}})


def tanh_as_sigmoid(model) -> int:
    """``Tanh(x)`` -> ``2 * Sigmoid(2 x) - 1``: QNN's provider takes no float Tanh (Gemma-2's soft
    caps), and HTP runs Sigmoid. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    tanhs = [n for n in g.node if n.op_type == "Tanh"]
    if tanhs:
        g.initializer.extend([numpy_helper.from_array(np.asarray(np.float32(2.0)), "qnn_two"),
                              numpy_helper.from_array(np.asarray(np.float32(1.0)), "qnn_one")])
    for n in tanhs:
        index = list(g.node).index(n)
        g.node.remove(n)
        a, s, m = (f"{n.output[0]}_{k}" for k in ("x2", "sig", "m2"))
        for j, node in enumerate([helper.make_node("Mul", [n.input[0], "qnn_two"], [a], name=a),
                                  helper.make_node("Sigmoid", [a], [s], name=s),
                                  helper.make_node("Mul", [s, "qnn_two"], [m], name=m),
                                  helper.make_node("Sub", [m, "qnn_one"], list(n.output), name=n.name)]):
            g.node.insert(index + j, node)
    return len(tanhs)


_LAYOUT = ("Unsqueeze", "Squeeze", "Transpose", "Reshape", "Expand", "Identity", "Flatten")


def _float_mask(g, name: str, producer, inits, added: list) -> str | None:
    """A float 0/1 tensor equal to boolean tensor ``name`` (a mask), built from the float it was
    made of: ``Cast(f, bool)`` or ``Greater(f, 0.5)`` of a 0/1 float ``f``, layout ops of a mask,
    ``And`` with an all-true constant, ``And`` of two masks (their product). None if not a mask."""
    from onnx import TensorProto, helper, numpy_helper

    n = producer.get(name)
    if n is None:
        if name in inits and inits[name].data_type == TensorProto.BOOL:
            f = f"{name}_as_float"
            if f not in inits:
                inits[f] = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float32), f)
                g.initializer.append(inits[f])
            return f
        return None
    if n.op_type == "Cast" and next(a.i for a in n.attribute if a.name == "to") == TensorProto.BOOL:
        return n.input[0]
    if n.op_type == "Greater" and n.input[1] in inits and float(numpy_helper.to_array(inits[n.input[1]])) == 0.5:
        return n.input[0]
    if n.op_type in _LAYOUT:
        inner = _float_mask(g, n.input[0], producer, inits, added)
        if inner is None:
            return None
        node = helper.make_node(n.op_type, [inner, *n.input[1:]], [f"{name}_as_float"], name=f"{name}_as_float")
        node.attribute.extend(n.attribute)
        added.append((n, node))
        return node.output[0]
    if n.op_type == "And":
        a, b = (_float_mask(g, i, producer, inits, added) for i in n.input)
        if a is None or b is None:
            return None
        node = helper.make_node("Mul", [a, b], [f"{name}_as_float"], name=f"{name}_as_float")
        added.append((n, node))
        return node.output[0]
    return None


def mask_wheres_as_adds(model, bias: float) -> int:
    """``Where(mask, x, c)`` with ``mask`` a boolean attention mask made of a float 0/1 input (see
    :func:`_float_mask`) and ``c`` a constant at or below ``-bias`` (a masked attention logit) ->
    ``x + (m - 1) * bias`` with ``m`` the mask in float: after the softmax the same weights (0
    where masked) when the logits ``x`` stay well inside ``bias``, and no boolean tensors, which
    HTP fails on (a rank-5 boolean mask: ``QNN_COMMON_ERROR_MEM_ALLOC`` when the graph is
    finalized; the QNN form's boolean rewrites break on Sana's caption mask). A bias far above the
    logits does not work on HTP: 1e3 over Gemma-2's logits capped at 50 put its output off by 0.86 x
    max|out|, 200 by 1e-2 (its float16 sums). Run it before the QNN form. Returns the number of
    nodes rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    count = 0
    for n in list(g.node):
        if n.op_type != "Where" or n.input[2] not in inits:
            continue
        if float(numpy_helper.to_array(inits[n.input[2]]).max()) > -bias:
            continue
        added: list = []
        m = _float_mask(g, n.input[0], producer, inits, added)
        if m is None:
            continue
        if not count:
            g.initializer.extend([numpy_helper.from_array(np.asarray(np.float32(bias)), "qnn_mask_bias"),
                                  numpy_helper.from_array(np.asarray(np.float32(1.0)), "qnn_mask_one")])
        for old, node in added:  # each float copy right after the boolean node it mirrors
            if node.output[0] not in producer:
                g.node.insert(list(g.node).index(old) + 1, node)
                producer[node.output[0]] = node
        index = list(g.node).index(n)
        g.node.remove(n)
        s, b = f"{n.output[0]}_m1", f"{n.output[0]}_bias"
        for j, node in enumerate([helper.make_node("Sub", [m, "qnn_mask_one"], [s], name=s),
                                  helper.make_node("Mul", [s, "qnn_mask_bias"], [b], name=b),
                                  helper.make_node("Add", [n.input[1], b], list(n.output), name=n.name)]):
            g.node.insert(index + j, node)
        count += 1
    prune_dead_nodes(model)
    return count


def prune_dead_nodes(model) -> int:
    """Removes nodes none of whose outputs is read (by a node or as a graph output)."""
    g = model.graph
    removed = 0
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return removed


# ----------------------------------------------------------------------------- the text-to-image folder

#: Weight bits of the text encoder and the decoder, quantized after training (activations in 16 bits
#: on HTP, calibrated): 8 (W8A16, as Qualcomm AI Hub ships its diffusion pipelines; default) or 4.
COMPONENT_BITS = (8, 4)
SUBFOLDERS = ("text_encoder", "transformer", "vae_decoder")


def quantize_after_training(model, bits: int):
    """Weight-only quantization of every Linear and Conv (per output channel, symmetric, ``bits``);
    the QNN form gives their inputs and outputs calibrated 16-bit ranges."""
    import fraqat_jax

    if bits not in COMPONENT_BITS:
        raise ValueError(f"--component-bits must be one of {', '.join(map(str, COMPONENT_BITS))}, got {bits!r}")
    return fraqat_jax.quantize_model(model, [fraqat_jax.Rule(".*", weight_bits=bits, act_bits=None, channel_axis=-1)])


def jitted(model):
    """``feeds -> output`` (numpy in and out) of an NNX module called with keyword arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, kw: nnx.merge(graphdef, st)(**kw))
    return lambda feeds: np.asarray(fn(state, {k: jnp.asarray(v) for k, v in feeds.items()}), np.float32)


def write_qnn_with(model, example: Mapping, calibration, out_dir: str, passes=()) -> dict:
    """:func:`fraqat_jax.export.qnn.write_qnn` with ``passes`` (``proto -> count``) run on the traced
    graph before the QNN form; also returns their ``rewrites`` counts."""
    import fraqat_jax
    from fraqat_jax.export import onnx as eo
    from fraqat_jax.export.qnn import save_qnn, to_qnn

    qdq = eo.to_onnx(model, example, frozen=fraqat_jax.freeze(eo.static_view(model)), batch_size=1)
    proto, counts = qdq.proto, qdq.counts
    rewrites = {getattr(fn, "__name__", None) or fn.func.__name__: fn(proto) for fn in passes}
    main, prologue, qcounts = to_qnn(proto, qdq.weight_outputs, calibration, 16)
    paths = save_qnn(main, prologue, out_dir)
    return {"model": main, "prologue": prologue, "paths": paths, "counts": counts, "qdq": qcounts, "rewrites": rewrites}


def build_component(model, example: Mapping, calibration, held, out_dir: str, sub: str, *, soc: str,
                    passes=(), log=print) -> dict:
    """``out_dir/sub``: ``model.onnx`` (+ prologue) of ``model`` in the QNN form, rewritten by
    ``passes`` (``proto -> count``), compiled for HTP with CPU fallback disabled (its EPContext
    model) and checked on the ``held`` feeds against onnxruntime's CPU and the frozen JAX model;
    writes ``qnn.json`` and returns the figures (``tol_ort``: :func:`fraqat_jax.export.qnn.ort_tolerance`
    of the graph's ``fp16_sensitivity`` on the same feeds). Raises :class:`~fraqat_jax.export.qnn.QnnRefused`
    naming the nodes HTP did not take."""
    import tempfile

    import onnx

    import fraqat_jax
    from fraqat_jax.export import qnn
    from fraqat_jax.export.onnx import static_view

    folder = os.path.join(out_dir, sub)
    os.makedirs(folder, exist_ok=True)
    written = write_qnn_with(model, example, calibration, folder, passes)
    path, prologue, proto, rewrites = (written["paths"]["model"], written["paths"].get("prologue"), written["model"],
                                       written["rewrites"])
    ctx = os.path.join(folder, qnn.CONTEXT_FILE)
    try:
        session, build_s = qnn.timed(qnn.qnn_session, path, soc, context_path=ctx)
    except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types)
        with tempfile.TemporaryDirectory() as scratch:
            refused = qnn.refused_nodes(path, soc, scratch)
        raise qnn.QnnRefused(f"QNN HTP did not take {sub}: {', '.join(refused[:20]) or str(e).splitlines()[0]}") from None
    htp, cpu = qnn.QnnModel(session, prologue), qnn.QnnModel(qnn.cpu_session(path), prologue)
    ctx_model = qnn.QnnModel(qnn.qnn_session(ctx, soc), prologue)
    frozen = jitted(fraqat_jax.freeze(static_view(model)))  # one compilation for every held feed
    got, ref = [htp(f) for f in held], [cpu(f) for f in held]
    chip = qnn.soc_of(soc)
    sensitivity = qnn.fp16_sensitivity(proto, prologue, held, ref)
    report = {"soc": chip.name, "htp_arch": chip.htp_arch, "soc_model": chip.soc_model, "nodes": len(proto.graph.node),
              "nodes_on_qnn": len(proto.graph.node), "max_rel_diff_ort": qnn.rel_diff(got, ref),
              "fp16_sensitivity": sensitivity, "tol_ort": qnn.ort_tolerance(sensitivity),
              "max_rel_diff_student": qnn.rel_diff(got, [frozen(f) for f in held]),
              "max_rel_diff_context": qnn.rel_diff([ctx_model(f) for f in held], got),
              "context_bytes": qnn.context_bytes(ctx), "weight_bytes": int(written["counts"]["weight_bytes"]),
              "weight_bytes_bf16": int(written["counts"]["weight_bytes_bf16"]), "context_build_seconds": round(build_s, 2),
              "qdq": written["qdq"], "rewrites": rewrites}
    with open(os.path.join(folder, qnn.REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    log(f"{sub}: {report['nodes']} nodes whole on QNN HTP; vs onnxruntime CPU {report['max_rel_diff_ort']:.2e} "
        f"(tolerance {report['tol_ort']:.2g}), "
        f"vs JAX {report['max_rel_diff_student']:.2e}; context {report['context_bytes']} bytes")
    return report


def _text_settings(text_length: int, pad_id: int, lowercase: bool) -> dict:
    return {"tokenizer": "tokenizer/tokenizer.json", "length": int(text_length), "pad_id": int(pad_id),
            "lowercase": bool(lowercase),
            "ids_input": "input_ids", "mask_input": "attention_mask", "output": "sample",
            "uncond_embedding": "constants/uncond_embedding.npy", "uncond_mask": "constants/uncond_mask.npy"}


def trajectories(transformer, settings: Mapping, cond_rows, uncond: Mapping, latent_shape, *, steps: int,
                 guidance: float, seed: int):
    """The sampler's own inputs: for each conditioning in ``cond_rows`` (transformer feeds), the
    runner's loop (``fraqat_jax.deploy.image.sample``) with ``transformer`` (feeds -> output) from
    the seed's noise; returns ``(every transformer call's feeds, the final latents)``."""
    from fraqat_jax.deploy.image import sample

    calls, finals = [], []

    def record(feeds):
        calls.append({k: np.asarray(v) for k, v in feeds.items()})
        return {"sample": transformer(feeds)}

    manifest = {"sampler": settings, "transformer_io": {"latent": "hidden_states", "timestep": "timestep",
                                                        "output": "sample"}}
    for i, cond in enumerate(cond_rows):
        noise = np.random.default_rng(seed + i).standard_normal(tuple(latent_shape)).astype(np.float32)
        finals.append(sample(record, manifest, noise, cond, uncond, steps=steps, guidance=guidance))
    return calls, finals


def export_image_pipeline(text_encoder, transformer, vae, tokenizer_file: str, out_dir: str, *,  # long: one pass over the three networks
                          prompts, heldout_prompts, text_length: int, sampler: Mapping, latent_shape, pad_id: int = 0,
                          soc: str = "sm8750", component_bits: int = 8, calibration_steps: int | None = None,
                          mask_bias: float = 200.0, lowercase: bool = False, log=print) -> dict:
    """Writes the text-to-image folder (module doc) for a trained W4A8 ``transformer`` (static input
    ranges; called ``(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)``), a text encoder
    (``(input_ids, attention_mask) -> [1, L, D]``) and a decoder (raw latents -> images in
    [-1, 1]), e.g. :class:`fraqat_jax.diffusion.pipeline.TextEncoderGraph` / ``DecoderGraph``.

    The text encoder and the decoder are quantized here (``component_bits``-bit weights, 16-bit
    activations on HTP), calibrated on the tokenized ``prompts`` and on the final latents of the
    sampler's own trajectories for them; the transformer's product ranges on those trajectories'
    inputs. ``heldout_prompts`` (neither traced nor calibrated on) give the agreement figures.
    ``mask_bias``: the transformer's masked cross-attention logits as ``x - mask_bias``
    (:func:`mask_wheres_as_adds`; the text encoder uses 4 x its soft cap). ``lowercase``: the
    runner lower-cases and strips prompts before tokenizing (Sana's text preprocessing).
    Returns the manifest and each component's figures."""
    import functools
    import shutil

    from fraqat_jax.deploy.image import tokenize
    from fraqat_jax.export.onnx import static_view
    from fraqat_jax.export.qnn import CONTEXT_FILE, MODEL_FILE, PROLOGUE_FILE, REPORT_FILE, soc_of

    import fraqat_jax

    chip = soc_of(soc)
    os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "constants"), exist_ok=True)
    shutil.copy(tokenizer_file, os.path.join(out_dir, "tokenizer", "tokenizer.json"))
    text = _text_settings(text_length, pad_id, lowercase)

    def tokens(prompt):
        ids, mask = tokenize(out_dir, text, prompt)
        return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.float32)}

    # 1. The text encoder: weight-only quantization, JAX embeddings of every prompt and of "".
    encoder = quantize_after_training(text_encoder, component_bits)
    encode = jitted(fraqat_jax.freeze(static_view(encoder)))
    feeds = [tokens(p) for p in prompts]
    held_feeds = [tokens(p) for p in heldout_prompts]
    null = tokens("")
    null_emb = encode(null)
    np.save(os.path.join(out_dir, text["uncond_embedding"]), null_emb)
    np.save(os.path.join(out_dir, text["uncond_mask"]), null["attention_mask"])
    soft_cap = float(getattr(text_encoder, "lm", text_encoder).config.get("attn_logit_softcapping") or 50.0)
    figures = {"text_encoder": build_component(
        encoder, held_feeds[0], feeds, held_feeds, out_dir, "text_encoder", soc=chip.name, log=log,
        passes=(tanh_as_sigmoid, functools.partial(mask_wheres_as_adds, bias=4 * soft_cap)))}
    # 2. The transformer on the sampler's own inputs (JAX, the frozen student).
    steps = int(calibration_steps or sampler["steps"])
    denoise = jitted(fraqat_jax.freeze(static_view(transformer)))
    def cond(f):
        return {"encoder_hidden_states": encode(f), "encoder_attention_mask": f["attention_mask"]}

    uncond = {"encoder_hidden_states": null_emb, "encoder_attention_mask": null["attention_mask"]}
    guidance = float(sampler["guidance"])
    calls, finals = trajectories(denoise, sampler, [cond(f) for f in feeds], uncond, latent_shape, steps=steps,
                                 guidance=guidance, seed=0)
    held_calls, held_finals = trajectories(denoise, sampler, [cond(f) for f in held_feeds], uncond, latent_shape,
                                           steps=steps, guidance=guidance, seed=10_000)
    figures["transformer"] = build_component(transformer, held_calls[0], calls, held_calls[:: max(1, len(held_calls) // 4)],
                                             out_dir, "transformer", soc=chip.name, log=log,
                                             passes=(functools.partial(mask_wheres_as_adds, bias=mask_bias),))
    # 3. The decoder on the trajectories' final latents.
    scale = float(vae.vae.scaling_factor) if hasattr(vae, "vae") else 1.0
    decoder = quantize_after_training(vae, component_bits)
    figures["vae_decoder"] = build_component(
        decoder, {"latent": held_finals[0] / scale}, [{"latent": z / scale} for z in finals],
        [{"latent": z / scale} for z in held_finals], out_dir, "vae_decoder", soc=chip.name, log=log)
    files = {"onnx": MODEL_FILE, "context": CONTEXT_FILE, "prologue": PROLOGUE_FILE, "report": REPORT_FILE}
    w_act = {"weights": f"int{component_bits} per output channel (after training)",
             "activations": "uint16, ranges calibrated on the sampler's prompts and latents"}
    manifest = {
        "kind": "image", "soc": {"name": chip.name, "soc_model": chip.soc_model, "htp_arch": chip.htp_arch},
        "conditioning": "text", "text": text, "sampler": dict(sampler),
        "latent": {"shape": [int(d) for d in latent_shape], "scaling_factor": scale},
        "transformer_io": {"latent": "hidden_states", "timestep": "timestep", "output": "sample",
                           "text": "encoder_hidden_states", "text_mask": "encoder_attention_mask"},
        "vae_io": {"latent": "latent", "output": "sample"},
        "components": {
            "text_encoder": component_entry(out_dir, "text_encoder", w_act, files),
            "transformer": component_entry(out_dir, "transformer", {
                "weights": "int4 (trained W4)", "activations": "uint8 grid of the trained A8 ranges, uint16 products"}, files),
            "vae_decoder": component_entry(out_dir, "vae_decoder", w_act, files)}}
    write_manifest(out_dir, manifest)
    return {"manifest": manifest, "figures": figures, "text_encoder": encoder, "vae_decoder": decoder}
