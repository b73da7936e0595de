"""QNN HTP form of the ONNX export: the W4A8 student as Qualcomm's NPU runtime executes it whole.

``python -m fraqat_jax.export --workdir RUN --out DIR --format qnn [--soc sm8750] [--batch-size N]``
writes into the folder ``DIR``:

* ``model.onnx``: the QDQ graph of :mod:`fraqat_jax.export.onnx` at a fixed batch size ``N``
  (default 1), rewritten into the form below, which the QNN execution provider's HTP backend takes
  whole with CPU fallback disabled;
* ``model_ctx.onnx``: the EPContext model, the HTP context binary compiled for ``--soc``
  (embedded), which a phone app loads without compiling;
* ``prologue.onnx``: the host part (float32, onnxruntime's CPU provider): the sinusoidal features
  of the timestep (and of guidance, sizes, position ids), which are ``model.onnx``'s extra inputs;
* ``qnn.json``: ``soc``, ``htp_arch``, ``nodes`` (of ``model.onnx``), ``nodes_on_qnn``,
  ``max_rel_diff_ort``, ``max_rel_diff_student``, ``context_bytes`` and ``weight_bytes``;
* ``pipeline.json`` (written by the command line, :mod:`fraqat_jax.export.qnn_pipeline`): the
  manifest ``python -m fraqat_jax.deploy`` runs the folder with.

The HTP here is the ``onnxruntime-qnn`` wheel's ``libQnnHtp.so`` on x86-64: Qualcomm's simulator of
the NPU, the same backend and graph compiler a phone uses, and no timing of a phone.

The rules of the graph (each found from the backend's answers and checked in
``tests/test_export_qnn.py``; docs/deploy.md gives what was measured):

1. **Static shapes.** The provider refuses a dynamic batch ("Dynamic shape is not supported yet"):
   the graph is traced at batch ``N`` (``to_onnx(batch_size=N)``), every Reshape a constant.
2. **Explicit zero points** on every INT4/INT8 weight ``DequantizeLinear`` (the ONNX export writes
   them; 0, as ``freeze``'s codes are symmetric). Without one HTP misreads INT4 weights.
3. **Quantized products are whole QDQ node units**: ``DQ(activation) -> MatMul/Conv <-
   DQ(weight)`` followed by ``QuantizeLinear`` of the product (:func:`quantize_products`). A weight
   ``DequantizeLinear`` with per-channel scales that does not feed such a unit is refused
   ("standalone DQ op with per-channel quantization"). HTP's MatMul, Gemm and Conv pair the widths
   of input and output: an 8-bit activation only with an 8-bit output, a 16-bit one with 16 bits.
   The product's output range is calibrated (min/max over the calibration inputs, widened by
   ``OUTPUT_MARGIN``). ``--product-bits 16`` (default): a W4A8 layer's input is its trained uint8
   grid carried exactly in uint16 (scale / 257, zero point x 257, so code ``q`` is ``257 q``: the
   same values, A8 as trained) and the product is re-quantized to uint16. ``--product-bits 8``: the
   uint8 input itself and a uint8 product, HTP's 8-bit kernels; every product then rounds to 256
   levels, which training never did. A layer without input quantization (W4A16, the ``keep``
   rule) gets uint16 input and output ranges from calibration. The bias ``Add`` follows the unit
   in float, so onnxruntime's MatMul+Add fusion into ``Gemm`` never sees an INT4 weight. A conv
   kernel is stored transposed (:func:`fold_weight_transposes`) so the Conv reads its DQ.
4. **MatMul, not Einsum** (refused): the converter writes every contraction as Transpose/Reshape
   and one batched MatMul.
5. **Rank <= 5**: a Reshape -> Transpose -> Reshape through a rank-6 tensor (unpatchify) is
   rewritten as moves of one axis at a time on merged axes (:func:`lower_rank`, rank <= 4 each).
6. **No boolean And, no boolean layout ops**: attention masks in float
   (:func:`bool_ands_as_products`, :func:`bool_layout_as_float`); HTP fails to add a boolean And and
   to prepare a rank-5 uint8 (boolean) Reshape.
7. **Graph inputs quantized on HTP** (``offload_graph_io_quantization=0``): otherwise a
   QuantizeLinear of a graph input is left to the CPU.
8. **Everything else in fp16**: norms, softmax, GELU/SiLU, residual adds and modulation run as
   float32 ONNX ops, which HTP executes in fp16 (``enable_htp_fp16_precision``, its default): unlike
   uint16 QDQ it needs no calibrated range for every tensor (a residual stream's range calibrated
   on some inputs clips on others). fp16 fails on ``sin``/``cos`` of large arguments (a timestep
   near 1000 keeps little of its fraction), so those nodes and everything they depend on form the
   host prologue (``prologue.onnx``).

Agreement (``--format qnn`` exits 1 when one fails): on held-out training-style inputs, QNN HTP
against onnxruntime's CPU provider on ``model.onnx``: ``<= tol_ort`` x max|out| (:func:`ort_tolerance`
of ``fp16_sensitivity``, how far rounding every float tensor to fp16 moves the CPU output: HTP's
fp16 ops flip A8 grid points, and how far a flip carries depends on the trained weights); against the
exported student served in JAX (the frozen student with static input ranges, as
``fraqat_jax.export.load(static=True)`` serves it): ``<= TOL_STUDENT``; the EPContext model against
the QNN run of ``model.onnx``: ``<= TOL_CONTEXT``. A sampling run of ``SAMPLING_STEPS`` steps from
the same noise gives the PSNR of the QNN samples against the JAX student's.

Requires the ``qnn`` extra (``pip install 'fraqat_jax[qnn]'``: ``onnxruntime-qnn``, a plugin
execution provider for the standard ``onnxruntime`` package, which it leaves in place).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fraqat_jax.export.onnx import OUTPUT_NAME, OnnxExportError
from fraqat_jax.export.qnn_graph import (OUTPUT_MARGIN, PRODUCT_BITS, bool_ands_as_products, bool_layout_as_float,
                                         cpu_session, fold_weight_transposes, fp16_rounded, lower_rank,
                                         quantize_products, split_prologue, to_qnn)
from fraqat_jax.deploy.common import EP_NAME
from fraqat_jax.quant import rel_diff

__all__ = [  # qnn_graph's surgery and quant's rel_diff are re-exported: one import for the QNN form
    "CONTEXT_FILE", "DEFAULT_SOC", "EP_NAME", "MODEL_FILE", "OUTPUT_MARGIN", "PRODUCT_BITS", "PROLOGUE_FILE", "REPORT_FILE",
    "REPORT_KEYS", "SOCS", "TOL_CONTEXT", "TOL_FP16", "TOL_ORT", "TOL_STUDENT", "OnnxExportError", "QnnModel",
    "QnnRefused", "QnnUnavailable", "Soc", "bool_ands_as_products", "bool_layout_as_float", "context_bytes",
    "cpu_session", "export_qnn", "fold_weight_transposes", "fp16_rounded", "fp16_sensitivity", "lower_rank",
    "ort_tolerance", "qnn_module", "qnn_session", "quantize_products",
    "refused_nodes", "rel_diff", "sampling_psnr", "save_qnn", "soc_of", "split_prologue", "summary", "to_qnn",
    "write_qnn",
]

TOL_ORT = 2e-2  # QNN HTP vs onnxruntime CPU on model.onnx, x max|out|: the floor of ort_tolerance
TOL_FP16 = 3.0  # HTP's fp16 ops approximate more than rounding: HTP / fp16-rounded CPU 0.9-1.8 (docs/deploy.md)
TOL_STUDENT = 5e-2  # QNN HTP vs the exported JAX student, x max|out|
TOL_CONTEXT = 1e-5  # the EPContext model vs the QNN run of model.onnx, x max|out|
EXTRA = "pip install 'fraqat_jax[qnn]'"
MODEL_FILE, CONTEXT_FILE, PROLOGUE_FILE, REPORT_FILE = "model.onnx", "model_ctx.onnx", "prologue.onnx", "qnn.json"


@dataclass(frozen=True)
class Soc:
    name: str
    soc_model: int  # QNN's SoC id (the provider's ``soc_model``)
    htp_arch: int  # Hexagon tensor processor version (``htp_arch``)
    phone: str


# soc_model ids and their HTP versions as the wheel's backend names them: with soc_model=43 / 57 /
# 69 / 87 its log says "soc SM8550 / SM8650 / SM8750 / SM8850" and "arch associated with SoC ..
# will overwrite it to 73 / 75 / 79 / 81" (onnxruntime-qnn 2.7.0, QAIRT 2.51).
SOCS = {
    "sm8750": Soc("sm8750", 69, 79, "Snapdragon 8 Elite (Galaxy S25 Ultra, the paper's phone)"),
    "sm8650": Soc("sm8650", 57, 75, "Snapdragon 8 Gen 3"),
    "sm8550": Soc("sm8550", 43, 73, "Snapdragon 8 Gen 2"),
    "sm8850": Soc("sm8850", 87, 81, "SM8850"),
}
DEFAULT_SOC = "sm8750"


class QnnUnavailable(ImportError):
    """``onnxruntime-qnn`` is not installed (the message names the extra)."""


class QnnRefused(RuntimeError):
    """QNN HTP did not take the whole graph, or failed to compile it (the message names the nodes)."""


def soc_of(name: str) -> Soc:
    key = str(name).strip().lower()
    if key not in SOCS:
        raise ValueError(f"unknown --soc {name!r}; allowed: {', '.join(SOCS)}")
    return SOCS[key]


def qnn_module():
    """The ``onnxruntime_qnn`` package, registered with onnxruntime once."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as e:
        raise QnnUnavailable(f"--format qnn needs onnxruntime-qnn (Qualcomm's QNN execution provider): {EXTRA} ({e})") from None
    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn


def qnn_session(path: str, soc: str = DEFAULT_SOC, *, fallback: bool = False, context_path: str | None = None,
                log_level: int = 3):
    """An onnxruntime session of ``path`` on QNN HTP (``libQnnHtp.so`` of the wheel) for ``soc``.

    ``fallback=False`` sets ``session.disable_cpu_ep_fallback``: creation fails unless every node
    runs on HTP. ``context_path``: also write the EPContext model there (``ep.context_enable``,
    the context binary embedded, ``ep.context_embed_mode=1``)."""
    import onnxruntime as ort

    from fraqat_jax.deploy.common import htp_options

    qnn_module()
    chip = soc_of(soc)
    options = htp_options({"soc_model": chip.soc_model, "htp_arch": chip.htp_arch}, fallback=fallback,
                          log_level=log_level)
    if context_path is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_embed_mode", "1")
        options.add_session_config_entry("ep.context_file_path", context_path)
    return ort.InferenceSession(path, options)


# ----------------------------------------------------------------------------- running


class QnnModel:
    """``prologue.onnx`` on the CPU, then ``model.onnx`` (or the EPContext model) on a session:
    call with the flat feeds of the exported model's original inputs."""

    def __init__(self, session, prologue_path: str | None):
        self.session = session
        self.prologue = cpu_session(prologue_path) if prologue_path else None
        self.inputs = [i.name for i in session.get_inputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = dict(feeds)
        if self.prologue is not None:
            names = [o.name for o in self.prologue.get_outputs()]
            pro_in = {i.name: feeds[i.name] for i in self.prologue.get_inputs()}
            feeds.update(zip(names, self.prologue.run(names, pro_in)))
        return self.session.run([OUTPUT_NAME], {k: feeds[k] for k in self.inputs})[0]


def refused_nodes(model_path: str, soc: str, scratch: str) -> list[str]:
    """``op_type name`` of each node of ``model_path`` that QNN HTP does not take: the nodes left
    outside the EPContext nodes when the graph is compiled with CPU fallback allowed."""
    import onnx

    ctx = os.path.join(scratch, "refused_ctx.onnx")
    qnn_session(model_path, soc, fallback=True, context_path=ctx)
    left = [n for n in onnx.load(ctx).graph.node if n.op_type != "EPContext"]
    return [f"{n.op_type} {n.name}" for n in left]


def context_bytes(ctx_path: str) -> int:
    """Size of the HTP context binary(ies) in an EPContext model (embedded or beside it)."""
    import onnx

    total = 0
    for n in onnx.load(ctx_path).graph.node:
        if n.op_type != "EPContext":
            continue
        attrs = {a.name: a for a in n.attribute}
        embed = attrs["embed_mode"].i if "embed_mode" in attrs else 1
        blob = attrs["ep_cache_context"].s
        total += len(blob) if embed else os.path.getsize(os.path.join(os.path.dirname(ctx_path), blob.decode()))
    return total


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- stages
#
# trace -> QDQ graph with its weight map (onnx.to_onnx) -> QNN passes (qnn_graph.to_qnn) -> the
# files (save_qnn); then the checks that make the report: onnxruntime's CPU run of the file, the
# HTP compile, the JAX student, the EPContext model, a sampling run.


def write_qnn(model, example: Mapping[str, Any], calibration: Sequence[Mapping[str, np.ndarray]], out_dir: str,
              *, frozen=None, product_bits: int = 16) -> dict:
    """Writes ``out_dir/model.onnx`` (and ``prologue.onnx`` when there are sin/cos features) for
    ``model`` (quantized, static input ranges) called as ``model(**example)``; the batch size is
    ``example``'s. ``calibration``: flat feeds (``onnx.flat_inputs`` names) of the same shapes, for
    the product ranges; ``frozen``: ``fraqat_jax.freeze`` of ``model``'s static view if the caller
    has it (its codes are written). Returns ``model`` / ``prologue`` (protos), ``paths``, the
    exporter's ``counts``, the QNN rewrite's ``qdq`` counts and ``seconds`` (trace, rewrite)."""
    from fraqat_jax.export import onnx as eo

    start = time.perf_counter()
    flat, _ = eo.flat_inputs(example)
    batch = next(a.shape[0] for name, a in flat if name not in eo.BATCH_FREE)
    qdq = eo.to_onnx(model, example, frozen=frozen, batch_size=int(batch))
    traced = time.perf_counter() - start
    main, prologue, qcounts = to_qnn(qdq.proto, qdq.weight_outputs, calibration, product_bits)
    paths = save_qnn(main, prologue, out_dir)
    return {"model": main, "prologue": prologue, "paths": paths, "counts": qdq.counts, "qdq": qcounts,
            "seconds": (round(traced, 2), round(time.perf_counter() - start - traced, 2))}


def save_qnn(main, prologue, out_dir: str) -> dict[str, str]:
    """Writes ``model.onnx`` (checked with ``onnx.checker``, ``full_check``) and, when there is one,
    ``prologue.onnx`` into ``out_dir``; returns their paths (``model``, ``prologue``)."""
    import onnx

    paths = {"model": os.path.join(out_dir, MODEL_FILE)}
    onnx.save(main, paths["model"])
    onnx.checker.check_model(paths["model"], full_check=True)
    if prologue is not None:
        paths["prologue"] = os.path.join(out_dir, PROLOGUE_FILE)
        onnx.save(prologue, paths["prologue"])
    return paths


SAMPLING_STEPS = 10


def _feeds(family, batch) -> dict[str, np.ndarray]:
    """The flat feeds of a training-style batch: the model's keyword arguments (``family.model_kwargs``)."""
    import jax

    from fraqat_jax.export.onnx import flat_inputs

    return dict(flat_inputs(jax.tree.map(np.asarray, family.model_kwargs(batch)))[0])


def sampling_psnr(family, student_model, run_qnn, out_shape, batch, *, cfg, num_steps: int = SAMPLING_STEPS,
                  seed: int = 0) -> float:
    """PSNR (peak-to-peak 2) of ``num_steps``-step samples of ``run_qnn`` (flat feeds -> output)
    against the JAX ``student_model``'s, from the same noise and conditioning (``batch``'s), both
    drawn by the family's sampler (``Family.sample_like``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fraqat_jax.export.onnx import flat_inputs

    config = dict(getattr(student_model, "config", {}))
    graphdef, state = nnx.split(student_model)
    ref = family.sample_like(cfg, config, lambda st: nnx.merge(graphdef, st), state, batch, num_steps=num_steps,
                             seed=seed)

    def served(**kw):  # the QNN model called as the port is
        def host(kw):
            return np.asarray(run_qnn(dict(flat_inputs(jax.tree.map(np.asarray, kw))[0])), np.float32)

        return jax.pure_callback(host, jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32), kw)

    got = family.sample_like(cfg, config, lambda _: served, None, batch, num_steps=num_steps, seed=seed)
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def _checked_options(soc: str, batch_size, product_bits) -> Soc:
    """The SoC of ``soc``; ValueError naming a bad ``batch_size`` or ``product_bits``."""
    chip = soc_of(soc)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if product_bits not in PRODUCT_BITS:
        raise ValueError(f"--product-bits must be one of {', '.join(map(str, PRODUCT_BITS))}, got {product_bits!r}")
    return chip


class _Clock:
    """Seconds per stage: each ``lap`` takes the time since the last one."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.stages[name] = round(self.elapsed() - sum(self.stages.values()), 2)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _fresh_paths(out_dir: str) -> dict[str, str]:
    """The output files in ``out_dir`` (created), any earlier copy removed."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("model", MODEL_FILE), ("ctx", CONTEXT_FILE), ("prologue", PROLOGUE_FILE), ("json", REPORT_FILE))}
    for p in paths.values():
        if os.path.exists(p):
            os.remove(p)
    return paths


def _graph_report(chip: Soc, product_bits: int, batch_size: int, written: dict) -> dict[str, Any]:
    """The report's entries about the written graph: SoC, node count, sizes, QDQ counts."""
    counts = written["counts"]
    return {"soc": chip.name, "htp_arch": chip.htp_arch, "soc_model": chip.soc_model, "product_bits": int(product_bits),
            "nodes": len(written["model"].graph.node), "weight_bytes": int(counts["weight_bytes"]),
            "weight_bytes_bf16": int(counts["weight_bytes_bf16"]), "bf16_bytes": int(counts["bf16_bytes"]),
            "quantized_layers": counts["quantized_layers"], "batch_size": batch_size, "qdq": written["qdq"],
            "model_bytes": os.path.getsize(written["paths"]["model"])}


def _written_line(path: str, report: dict) -> str:
    q = report["qdq"]
    return (f"wrote {path}: {report['nodes']} nodes, batch {report['batch_size']}, {q.get('products', 0)} QDQ products "
            f"({q.get('out8', 0)} uint8, {q.get('out16', 0)} uint16 outputs; {q.get('act8_in16', 0)} A8 inputs "
            f"carried in uint16), {report['export_seconds']:.1f} s")


def _compile_htp(model_path: str, ctx_path: str, chip: Soc):
    """``((session, build seconds), [])`` for ``model_path`` on HTP with CPU fallback disabled (the
    compile also writes the EPContext model to ``ctx_path``), or ``(None, refused)`` naming what HTP
    did not take (the nodes, else the compile's error)."""
    import tempfile

    try:
        return timed(qnn_session, model_path, chip.name, context_path=ctx_path), []
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own Fail/RuntimeException types)
        with tempfile.TemporaryDirectory() as scratch:
            try:
                refused = refused_nodes(model_path, chip.name, scratch)
            except Exception as inner:  # noqa: BLE001
                refused = [f"(compile failed: {str(inner).splitlines()[0][:300]})"]
        return None, refused or [f"(compile failed: {str(e).splitlines()[0][:300]})"]


def export_qnn(teacher, student, cfg, out_dir: str, *, soc: str = DEFAULT_SOC, batch_size: int = 1,
               product_bits: int = PRODUCT_BITS[0], calibration_samples: int = 100, heldout_samples: int = 4,
               sampling: bool = True, log=print) -> dict:
    """Writes ``model.onnx``, ``prologue.onnx``, ``model_ctx.onnx`` and ``qnn.json`` into ``out_dir``
    (see the module doc) for a student with static input ranges; returns the report (``qnn.json``'s
    keys, ``ok``, ``refused``, ``max_rel_diff_context``, ``psnr_sampling``, times and sizes).

    The JAX reference is the student frozen in memory with its static ranges (what
    ``fraqat_jax.export.load(..., static=True)`` serves), whose codes the graph holds.
    Raises :class:`QnnUnavailable` without ``onnxruntime-qnn``; a graph that HTP does not take whole
    is reported (``ok`` False, ``refused`` naming the nodes), not raised."""
    import fraqat_jax
    from fraqat_jax.export.onnx import frozen_output, static_view
    from fraqat_jax.export.orbax import calibration_batches
    from fraqat_jax.family import family_for_model

    qnn_module()
    chip = _checked_options(soc, batch_size, product_bits)
    n, family, paths, clock = int(batch_size), family_for_model(teacher), _fresh_paths(out_dir), _Clock()
    held, calib = (calibration_batches(teacher, cfg, num_samples=n * -(-count // n), batch_size=n, seed=seed)
                   for count, seed in ((heldout_samples, 1), (calibration_samples, 0)))
    clock.lap("inputs")
    model = static_view(student)
    served = fraqat_jax.freeze(model, integer=False)
    written = write_qnn(model, _unflat(_feeds(family, held[0])), [_feeds(family, b) for b in calib], out_dir,
                        frozen=served, product_bits=product_bits)
    clock.stages["onnx"], clock.stages["qnn_form"] = written["seconds"]
    report = _graph_report(chip, product_bits, n, written)
    report["export_seconds"] = clock.elapsed()
    log(_written_line(paths["model"], report))
    pro_path, feeds = written["paths"].get("prologue"), [_feeds(family, b) for b in held]
    ref_ort = [QnnModel(cpu_session(paths["model"]), pro_path)(f) for f in feeds]
    clock.lap("ort_cpu")
    compiled, refused = _compile_htp(paths["model"], paths["ctx"], chip)
    if compiled is None:
        report.update(ok=False, refused=refused, nodes_on_qnn=report["nodes"] - sum(not r.startswith("(") for r in refused),
                      max_rel_diff_ort=None, max_rel_diff_student=None, context_bytes=0)
        _write_json(paths["json"], report)
        return report
    htp = QnnModel(compiled[0], pro_path)
    got = [htp(f) for f in feeds]
    sensitivity = fp16_sensitivity(written["model"], pro_path, feeds, ref_ort)
    report.update(context_build_seconds=compiled[1], nodes_on_qnn=report["nodes"], refused=[],
                  max_rel_diff_ort=rel_diff(got, ref_ort), fp16_sensitivity=sensitivity,
                  tol_ort=ort_tolerance(sensitivity))
    clock.lap("htp")
    report["max_rel_diff_student"] = rel_diff(got, [frozen_output(served, _unflat(f)) for f in feeds])
    clock.lap("student")
    ctx_session, load_s = timed(qnn_session, paths["ctx"], chip.name)  # loads the compiled binary, no compile
    ctx = QnnModel(ctx_session, pro_path)
    report.update(context_load_seconds=load_s, context_bytes=context_bytes(paths["ctx"]),
                  context_file_bytes=os.path.getsize(paths["ctx"]),
                  max_rel_diff_context=rel_diff([ctx(f) for f in feeds], got))
    clock.lap("context")
    if sampling:
        report.update(psnr_sampling=sampling_psnr(family, served, htp, got[0].shape, held[0], cfg=cfg),
                      sampling_steps=SAMPLING_STEPS)
        clock.lap("sampling")
    report["stage_seconds"] = clock.stages
    report["ok"] = (report["max_rel_diff_ort"] <= report["tol_ort"] and report["max_rel_diff_student"] <= TOL_STUDENT
                    and report["max_rel_diff_context"] <= TOL_CONTEXT)
    _write_json(paths["json"], report)
    return report


def ort_tolerance(sensitivity: float) -> float:
    """The HTP-vs-onnxruntime-CPU tolerance of a graph whose CPU output moves by ``sensitivity``
    (x max|out|) when its float tensors are rounded to fp16: ``TOL_ORT``, or ``TOL_FP16`` x
    ``sensitivity`` when larger, never above ``TOL_STUDENT`` (the tolerance against JAX)."""
    return float(min(TOL_STUDENT, max(TOL_ORT, TOL_FP16 * float(sensitivity))))


def fp16_sensitivity(model, prologue_path: str | None, feeds: Sequence[Mapping[str, np.ndarray]],
                     reference: Sequence[np.ndarray]) -> float:
    """max |CPU run of :func:`fp16_rounded` ``(model)`` - ``reference``| / max|reference| over
    ``feeds`` (``model``: the QNN-form ``onnx.ModelProto``; ``reference``: onnxruntime CPU's outputs
    of it on ``feeds``)."""
    rounded = QnnModel(cpu_session(fp16_rounded(model).SerializeToString()), prologue_path)
    return rel_diff([rounded(f) for f in feeds], list(reference))


def _unflat(feeds: Mapping[str, np.ndarray]) -> dict:
    """The model's keyword arguments from flat feeds (``a.b`` names rebuild nested dicts)."""
    out: dict[str, Any] = {}
    for name, value in feeds.items():
        head, _, rest = name.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[name] = value
    return out


REPORT_KEYS = ("soc", "htp_arch", "nodes", "nodes_on_qnn", "max_rel_diff_ort", "max_rel_diff_student",
               "context_bytes", "weight_bytes")  # qnn.json of a one-network folder (the report also has tol_ort)


def _write_json(path: str, report: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump({k: report.get(k) for k in REPORT_KEYS}, f, indent=2)
        f.write("\n")


def summary(report: dict) -> str:
    """Lines for the command line."""
    if not report.get("ok") and report.get("refused"):
        return (f"QNN HTP ({report['soc']}, v{report['htp_arch']}) did not take the whole graph: "
                f"{report['nodes_on_qnn']} of {report['nodes']} nodes; refused: {', '.join(report['refused'][:20])}")
    lines = [
        f"QNN HTP simulator ({report['soc']}, HTP v{report['htp_arch']}): all {report['nodes']} nodes with CPU "
        f"fallback disabled; context binary {report['context_bytes']} bytes (built in "
        f"{report.get('context_build_seconds', 0):.1f} s), INT4/INT8 weights {report['weight_bytes']} bytes",
        f"max |QNN - onnxruntime CPU| / max|out| = {report['max_rel_diff_ort']:.2e} (tolerance {report['tol_ort']:.2g}: fp16 "
        f"rounding moves the CPU output {report['fp16_sensitivity']:.2e}); "
        f"vs the exported JAX student {report['max_rel_diff_student']:.2e} ({TOL_STUDENT:g}); EPContext vs "
        f"model.onnx {report['max_rel_diff_context']:.2e} ({TOL_CONTEXT:g})",
    ]
    if "psnr_sampling" in report:
        lines.append(f"{report['sampling_steps']}-step samples, QNN vs JAX student from the same noise: "
                     f"PSNR {report['psnr_sampling']:.1f} dB")
    return "\n".join(lines)
