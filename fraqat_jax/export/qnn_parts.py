"""One part of a model too large for one HTP context, as its own folder: the part's graphs (a
prefill and a decode graph, or one graph) in the QNN form, compiled on HTP with CPU fallback
disabled, the prefill and decode graphs in one weight-sharing group so that the part's context
binary stores its weights once; graphs past the protobuf limit saved with external data. The
parts themselves (layer ranges of Gemma-2 with the hidden states as input and output) are
:mod:`fraqat_jax.text.parts`."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from fraqat_jax.export.qnn import DEFAULT_SOC, PRODUCT_BITS, context_bytes, qnn_module, qnn_session, soc_of
from fraqat_jax.export.qnn_graph import to_qnn
from fraqat_jax.export.qnn_text import GRAPHS, shared_context_sessions

__all__ = ["EXTERNAL_DATA_BYTES", "context_files", "export_text_part", "save_graph"]


def context_files(ctx_path: str) -> list[str]:
    """The context binary files an EPContext model written with ``embed_mode`` 0 points to."""
    import onnx

    return [next(a.s for a in n.attribute if a.name == "ep_cache_context").decode()
            for n in onnx.load(ctx_path).graph.node if n.op_type == "EPContext"]


#: A graph whose protobuf is larger than this is saved with its tensors in one external data file
#: beside it (``<file>.data``): protobuf cannot serialize a message of 2 GiB or more.
EXTERNAL_DATA_BYTES = 1536 * 2**20


def save_graph(model, path: str) -> bool:
    """Writes ``model`` to ``path`` (checked with ``onnx.checker``, ``full_check``), its tensors in
    ``<file>.data`` beside it when the protobuf is over :data:`EXTERNAL_DATA_BYTES`; returns whether
    it used external data."""
    import onnx

    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=1024)
    onnx.checker.check_model(path, full_check=True)
    return external


def export_text_part(step, out_dir: str, examples: Mapping[str, Mapping[str, np.ndarray]],
                     calibration: Mapping[str, Sequence[Mapping[str, np.ndarray]]], *, soc: str = DEFAULT_SOC,
                     product_bits: int = PRODUCT_BITS[0], passes=(), log=print) -> dict:
    """One part of a model too large for one HTP context (e.g. :class:`fraqat_jax.text.parts.Gemma2KVPart`,
    quantized, static input ranges): each graph of ``examples`` (``name -> feeds``, the step called
    as ``step(**feeds)``; ``prefill`` and ``decode``, or one graph) traced, rewritten by ``passes``
    (``proto -> count``), put in the QNN form with product ranges from ``calibration[name]``, saved
    as ``out_dir/<name>.onnx`` (:func:`save_graph`) and compiled on HTP with CPU fallback disabled:
    ``prefill`` and ``decode`` in one weight-sharing group (one context binary), a single graph
    alone (``<name>_ctx.onnx``). Returns the part's figures (also written as ``out_dir/qnn.json``):
    nodes, weight bytes (INT4/INT8 codes and scales) and their bf16 size, the context files and
    bytes, ``external_data``, the seconds of the export and of the HTP build."""
    import fraqat_jax
    from fraqat_jax.export import onnx as eo

    qnn_module()
    chip = soc_of(soc)
    os.makedirs(out_dir, exist_ok=True)
    frozen = fraqat_jax.freeze(step, unpack=False)  # its codes only: the packed layout, no CPU copy
    start = time.perf_counter()
    paths = {k: os.path.join(out_dir, f"{k}.onnx") for k in examples}
    ctx_paths = {k: os.path.join(out_dir, f"{k}_ctx.onnx") for k in examples}
    report: dict[str, Any] = {"soc": chip.name, "htp_arch": chip.htp_arch, "product_bits": int(product_bits),
                              "graphs": {}, "external_data": {}}
    for name, feeds in examples.items():
        qdq = eo.to_onnx(step, feeds, frozen=frozen, batch_size=1)
        rewrites = {getattr(fn, "__name__", None) or fn.func.__name__: fn(qdq.proto) for fn in passes}
        main, prologue, qcounts = to_qnn(qdq.proto, qdq.weight_outputs, calibration[name], product_bits)
        if prologue is not None:
            raise eo.OnnxExportError(f"the {name} graph computes sin/cos; the host gives them")
        for p in (ctx_paths[name], ctx_paths[name][:-len(".onnx")] + "_qnn.bin"):
            if os.path.exists(p):
                os.remove(p)
        report["external_data"][name] = save_graph(main, paths[name])
        report["graphs"][name] = {"nodes": len(main.graph.node), "products": qcounts.get("products", 0),
                                  "rewrites": rewrites}
        report["weight_bytes"] = int(qdq.counts["weight_bytes"])
        report["weight_bytes_bf16"] = int(qdq.counts["weight_bytes_bf16"])
        report["bf16_bytes"] = int(qdq.counts["bf16_bytes"])
        del qdq, main
    report["export_seconds"] = round(time.perf_counter() - start, 2)
    log(f"wrote {', '.join(paths.values())} in {report['export_seconds']:.1f} s")
    t0 = time.perf_counter()
    if set(examples) == set(GRAPHS):
        shared_context_sessions(paths, ctx_paths, chip.name)
    else:
        for name in examples:
            qnn_session(paths[name], chip.name, context_path=ctx_paths[name])
    report["context_build_seconds"] = round(time.perf_counter() - t0, 2)
    bins = sorted({b for k in examples for b in context_files(ctx_paths[k])}) if set(examples) == set(GRAPHS) else []
    report["context_files"] = bins or [os.path.basename(ctx_paths[k]) for k in examples]
    report["context_bytes"] = (sum(os.path.getsize(os.path.join(out_dir, b)) for b in bins) if bins
                               else sum(context_bytes(ctx_paths[k]) for k in examples))
    with open(os.path.join(out_dir, "qnn.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report
