"""ONNX export in QDQ form (opset 21): the quantized student as phone runtimes load it.

:func:`export_onnx` writes one ``.onnx`` file in which

* each quantized linear (or conv) layer is a ``DequantizeLinear`` of an **INT4** weight
  initializer (INT8 above 4 bits) with its float32 scales: one per tensor, one per output channel
  (``axis`` = the kernel's output axis) or one per group of input rows (``block_size``), and an
  explicit zero point 0 of the same type and shape (QNN HTP misreads INT4 without one), followed
  by the layer's ``MatMul`` (``Conv``) and bias ``Add``;
* its input passes ``QuantizeLinear`` -> ``DequantizeLinear`` with the layer's static uint8 scale
  ``(hi - lo) / 255`` and *integer* zero point ``round(-lo / scale)`` from the calibrated range
  ``act_range = [lo, hi]`` (``fraqat_jax.calibrate``);
* everything else (norms, softmax, residual adds, embeddings, modulation) is float32.

The weight codes are those of ``fraqat_jax.freeze`` byte for byte: ONNX packs INT4 with element 0
in the low nibble, as ``freeze`` does, so the packed bytes are written as they are and never
re-quantized (onnxruntime's own int4 quantizer divides by 7.5 where we divide by 7; it never
touches these weights). A layer called twice, or reachable by two paths, has one initializer.

Graph inputs are named as the model's call (``hidden_states``, ``timestep``, ``class_labels`` or
``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``, ``img_ids``, ...;
a nested dict such as PixArt's ``added_cond_kwargs`` gives ``added_cond_kwargs.resolution``), the
output is ``sample``, and axis 0 of every input except those in ``batch_free`` (Flux's
``img_ids``/``txt_ids``) is a dynamic ``batch`` dimension, or a fixed size with ``batch_size``
(every shape static, as QNN HTP needs: :mod:`fraqat_jax.export.qnn`). Products of activations
(attention) are ``MatMul``, never ``Einsum``.

How the graph is made: the model's float forward is traced with ``jax.make_jaxpr`` at a symbolic
batch size, each quantized layer wrapped in a ``jit`` named after it, and converted by
:mod:`fraqat_jax.export.jaxpr_onnx`, our own converter (why not ``jax2onnx``: see there). At each marked
layer the converter emits the QDQ pattern above instead of the layer's fake quantizers.

Agreement: the integer grid of a static range is exact only when ``-lo / scale`` is an integer
(``calibrate``'s nudge makes it so). The report's ``act_grid_shift`` is the largest
``|lo + zero_point * scale| / scale`` over the layers (0 up to float rounding after the nudge).
With ``check=True`` onnxruntime (CPU, basic graph optimizations) runs the file on the given inputs
and the report's ``max_rel_diff`` is ``max |onnx - frozen| / max |frozen|`` against
``fraqat_jax.freeze`` of the same model run in JAX (float32). Where no activation code differs
the two agree to float rounding. A code differs by one step where a value sits on a rounding
boundary: ONNX's ``QuantizeLinear`` rounds ``x / scale + zero_point``, the frozen student
``x * (1 / scale) + zero_point`` (:func:`fraqat_jax.quant.grid_codes`; what XLA computes for a
division by a scalar), its products are exact integer sums where onnxruntime sums rounded float
products (:func:`fraqat_jax.export.cpu_graph.exact_products` rewrites a graph into the student's
arithmetic), and float ops (``exp``, summation order) differ in their last bits; one such step
moves the output by a small fraction of max|out| (docs/deploy.md gives the measurements). ``TOLERANCE`` (a few such steps,
never a wrong graph) is enforced: the command line exits 1 above it, as the orbax export does.

Requires the ``onnx`` extra (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fraqat_jax
from fraqat_jax.export import jaxpr_onnx
from fraqat_jax.family import family_named
from fraqat_jax.export.jaxpr_onnx import onnx_dtype
from fraqat_jax.nn import (
    FrozenConv,
    FrozenLinear,
    QuantConv,
    QuantEinsum,
    QuantLinear,
    quantized_layers,
)
from fraqat_jax.nn.graph import path_string
from fraqat_jax.nn.layers import KernelView
from fraqat_jax.quant import rel_diff, static_codes

LAYER_PREFIX = "fraqat_onnx_layer_"
OUTPUT_NAME = "sample"
BATCH_FREE = ("img_ids", "txt_ids")
TOLERANCE = 1e-2  # onnxruntime vs the frozen model, x max |out|: the command line exits 1 above it (see below)


class OnnxExportError(ValueError):
    """A model setting the ONNX QDQ form cannot express (the message names the layer)."""


class _Marked(nnx.Module):
    """Stands in for a quantized layer while tracing: its float forward without the bias inside a
    ``jit`` whose name carries the layer's index, with the unquantized input and kernel as the
    jit's inputs; the bias is added after the jit (so the product's output is one tensor that the
    QNN form can re-quantize before the float bias add)."""

    def __init__(self, layer, index: int, base: type):
        self.layer = layer
        self.index = index
        self.base = base

    def __call__(self, x, out_sharding=None):
        layer, base = self.layer, self.base

        def body(x, kernel):
            return base.__call__(KernelView(layer, kernel=kernel, mask=None, bias=None, use_bias=False), x)

        body.__name__ = f"{LAYER_PREFIX}{self.index}"
        y = jax.jit(body)(x, layer.kernel[...])
        if layer.bias is None:
            return y
        bias = layer.bias[...]
        return y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)


# ----------------------------------------------------------------------------- layers


def _marked_copy(model):
    """A copy of ``model`` with each quantized layer replaced by a :class:`_Marked`; returns
    ``(copy, [(path, layer), ...])`` indexed as the marks."""

    model = nnx.clone(model)
    layers, marks = [], {}
    for path, layer in quantized_layers(model):
        if layer.bits is None and layer.act_bits is None:
            continue
        if isinstance(layer, QuantEinsum):
            raise OnnxExportError(f"layer {path!r} is a quantized einsum; the ONNX export handles Linear and Conv")
        base = nnx.Linear if isinstance(layer, QuantLinear) else nnx.Conv
        assert isinstance(layer, (QuantLinear, QuantConv))
        marks[id(layer)] = _Marked(layer, len(layers), base)
        layers.append((path, layer))
    # Replace every reference (a layer shared by two paths is one graph node, seen once).
    edits = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, _Marked):
            continue
        if isinstance(node, (list, nnx.List)):
            items = enumerate(node)
        elif isinstance(node, (dict, nnx.Dict)):
            items = node.items()
        elif isinstance(node, nnx.Module):
            items = [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
        else:
            items = []
        edits += [(node, k, marks[id(v)]) for k, v in items if id(v) in marks]
    for parent, key, mark in edits:
        if isinstance(parent, nnx.Module) and isinstance(key, str):
            setattr(parent, key, mark)
        else:
            parent[key] = mark
    placed = {id(mark) for _, _, mark in edits}
    missing = [path for path, layer in layers if id(marks[id(layer)]) not in placed]
    if missing:
        raise OnnxExportError(f"cannot replace quantized layers {missing} for tracing (the root, or inside a tuple)")
    return model, layers


def _weight_scale_layout(scale: np.ndarray, kernel_shape, group_size, path: str) -> dict:
    """DequantizeLinear scale tensor and attributes for ``freeze``'s scale layout."""
    if group_size is not None:  # (G, 1, out): one scale per group of rows and per column
        return {"scale": scale.reshape(scale.shape[0], scale.shape[-1]), "axis": 0, "block_size": int(group_size)}
    wide = [a for a, n in enumerate(scale.shape) if n != 1]
    if not wide:
        return {"scale": scale.reshape(())}
    if len(wide) > 1:
        raise OnnxExportError(f"layer {path!r} has weight scales of shape {scale.shape}; ONNX takes one "
                              "scale per tensor, per channel of one axis, or per block")
    return {"scale": scale.reshape(-1), "axis": wide[0]}


def _act_grids(layers) -> dict[int, tuple[np.float32, np.uint8, float]]:
    """Static input scale, integer zero point and grid shift ``|lo + zp * scale| / scale`` of each
    layer (by index) whose input is quantized."""

    ranges = {}
    for i, (path, layer) in enumerate(layers):
        if layer.act_bits is None:
            continue
        lo_hi = np.asarray(layer.act_range[...], np.float32)
        if not np.isfinite(lo_hi).all():
            raise OnnxExportError(
                f"layer {path!r} quantizes its input dynamically (act_granularity={layer.act_granularity!r}) "
                "and has no calibrated range; the ONNX QDQ form needs static ranges: run "
                "fraqat_jax.calibrate(model, batches) first (switch_to_static=False keeps the model dynamic)")
        if float(layer.act_bits) != 8.0:
            raise OnnxExportError(f"layer {path!r} has act_bits={layer.act_bits:g}; the ONNX export writes uint8 (8 bits)")
        ranges[i] = lo_hi
    if not ranges:
        return {}
    lo_hi = np.stack(list(ranges.values()))
    # The scale as training computed it (one call for all layers).
    _, scales, _ = jax.jit(static_codes, static_argnums=3)(jnp.zeros((len(ranges),)), lo_hi[:, 0], lo_hi[:, 1], 8.0)
    out = {}
    for i, (lo, _), scale in zip(ranges, lo_hi, np.asarray(scales, np.float32)):
        zero = float(np.clip(np.round(-lo / scale), 0, 255))
        out[i] = (scale, np.uint8(zero), abs(float(lo) + zero * float(scale)) / float(scale))
    return out


class _LayerEmitter:
    """The hook for marked layers: QDQ on the input, DequantizeLinear of the frozen codes."""

    def __init__(self, layers, frozen_layers):
        self.layers = layers
        self.frozen_layers = frozen_layers  # path -> FrozenLinear / FrozenConv of fraqat_jax.freeze
        self.grids = _act_grids(layers)
        self.weights: dict[int, str] = {}  # layer index -> name of its dequantized weight
        self.weight_bytes = 0
        self.weight_initializers = 0
        self.grid_shift = 0.0
        self.weight_outputs: dict[str, str] = {}  # name of a dequantized INT4/INT8 weight -> layer path

    def __call__(self, c, eqn, ins):
        index = int(str(eqn.params["name"])[len(LAYER_PREFIX):])
        path, layer = self.layers[index]
        x = ins[0]
        if layer.act_bits is not None:
            scale, zero, shift = self.grids[index]
            self.grid_shift = max(self.grid_shift, shift)
            dtype = eqn.invars[0].aval.dtype
            xf = x if dtype == jnp.float32 else c.node("Cast", [x], to=1)
            s, z = c.const(np.asarray(scale), f"{path}.input_scale"), c.const(np.asarray(zero), f"{path}.input_zero")
            x = c.node("DequantizeLinear", [c.node("QuantizeLinear", [xf, s, z]), s, z])
            if dtype != jnp.float32:
                x = c.node("Cast", [x], to=onnx_dtype(dtype))
        if index not in self.weights:
            self.weights[index] = self._weight(c, path, layer, eqn.invars[1].aval.dtype)
        inner = eqn.params["jaxpr"]
        return c.run(inner.jaxpr, list(inner.consts), [x, self.weights[index]])

    def _weight(self, c, path, layer, dtype) -> str:
        from onnx import TensorProto, numpy_helper

        if layer.bits is None:  # full-precision weights, quantized input only
            return c.const(np.asarray(layer.kernel[...]), f"{path}.kernel")
        frozen = self.frozen_layers[path]
        if frozen.kernel_zero is not None:
            raise OnnxExportError(f"layer {path!r} has asymmetric weights; ONNX INT4 weights here are "
                                  "symmetric (zero point 0): quantize it with symmetric=True")
        codes = np.asarray(frozen.kernel_codes[...])
        layout = _weight_scale_layout(np.asarray(frozen.kernel_scale[...], np.float32), frozen.kernel_shape,
                                      getattr(frozen, "group_size", None), path)
        if frozen.packed:  # freeze's nibbles are ONNX's INT4 layout: written as they are
            w = TensorProto(name=c.fresh(f"{path}.kernel_codes"), data_type=TensorProto.INT4,
                            dims=list(frozen.kernel_shape), raw_data=codes.tobytes())
        else:
            w = numpy_helper.from_array(codes.astype(np.int8), c.fresh(f"{path}.kernel_codes"))
        c.add_initializer(w)
        scale = layout.pop("scale")
        # An explicit zero point (0: freeze's codes are symmetric) of the weight's type and the
        # scale's shape: QNN HTP reads a missing INT4 zero point wrongly (export/qnn.py).
        zero = TensorProto(name=c.fresh(f"{path}.kernel_zero"), data_type=w.data_type, dims=list(scale.shape))
        if frozen.packed:
            zero.raw_data = bytes((scale.size + 1) // 2)
        else:
            zero.raw_data = bytes(scale.size)
        c.add_initializer(zero)
        self.weight_bytes += len(codes.tobytes()) + scale.nbytes
        self.weight_initializers += 1
        out = c.node("DequantizeLinear", [w.name, c.const(scale, f"{path}.kernel_scale"), zero.name], **layout)
        self.weight_outputs[out] = path
        return out if dtype == jnp.float32 else c.node("Cast", [out], to=onnx_dtype(dtype))


# ----------------------------------------------------------------------------- export


def flat_inputs(inputs: Mapping[str, Any]):
    """``[(name, array)]`` of the (possibly nested) call arguments, and the tree to rebuild them."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(dict(inputs))
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves]
    return [(n, np.asarray(v)) for n, (_, v) in zip(names, leaves)], tree


def static_view(model):
    """A copy of ``model`` as a static runtime runs it: every layer with a calibrated input range
    uses it (``act_granularity = "static"``), also where training kept dynamic ranges
    (``calibrate(..., switch_to_static=False)``). The input model is not changed."""

    model = nnx.clone(model)
    for _, layer in quantized_layers(model):
        if layer.act_bits is not None and np.isfinite(np.asarray(layer.act_range[...])).all():
            layer.act_granularity = "static"
    return model


def frozen_layers(frozen) -> dict[str, Any]:
    """``path -> FrozenLinear / FrozenConv`` of a model returned by ``fraqat_jax.freeze``."""

    return {path_string(p): node for p, node in nnx.iter_graph(frozen) if isinstance(node, (FrozenLinear, FrozenConv))}


@dataclass(frozen=True)
class QdqGraph:
    """What :func:`to_onnx` returns: the traced QDQ graph and what later stages read from the trace."""

    proto: Any  # the onnx.ModelProto
    counts: dict[str, Any]  # see export_onnx's report
    weight_outputs: dict[str, str]  # name of each dequantized INT4/INT8 weight tensor -> its layer's path


def to_onnx(model, inputs: Mapping[str, Any], *, batch_free: Sequence[str] = BATCH_FREE, frozen=None,
            batch_size: int | None = None) -> QdqGraph:
    """The QDQ graph of ``model`` (quantized, calibrated) called as ``model(**inputs)``: the
    ``onnx.ModelProto``, its counts (see :func:`export_onnx`) and its weight map (which tensor is
    which layer's dequantized weight, for :mod:`fraqat_jax.export.qnn`). ``inputs`` fix every shape
    but the batch axis; ``frozen`` is ``fraqat_jax.freeze(model)`` if the caller has it (its codes
    are written). ``batch_size``: a fixed batch size (every shape static, as QNN HTP needs) instead
    of the dynamic ``batch`` dimension."""
    from onnx import helper

    model = static_view(model)
    flat, tree = flat_inputs(inputs)
    batched = [name not in batch_free for name, _ in flat]
    if not any(batched):
        raise OnnxExportError(f"every input is in batch_free={tuple(batch_free)}; one needs a batch axis")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise OnnxExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    (b,) = (int(batch_size),) if batch_size is not None else jax.export.symbolic_shape("batch")
    specs = [jax.ShapeDtypeStruct(((b,) + a.shape[1:]) if bat else a.shape, a.dtype)
             for (_, a), bat in zip(flat, batched)]
    marked, layers = _marked_copy(model)

    def call(*args):
        return marked(**jax.tree_util.tree_unflatten(tree, list(args)))

    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*specs)
    # A model returning a dict of arrays gives one graph output per key (a cached language-model
    # step: logits and new keys / values); one array is the output ``sample``.
    out_names = sorted(out_shape) if isinstance(out_shape, dict) else [OUTPUT_NAME]
    if len(closed.out_avals) != len(out_names):
        raise OnnxExportError(f"the model returns {len(closed.out_avals)} arrays; the export names one ({OUTPUT_NAME!r}) "
                              "or one per key of a returned dict")
    emitter = _LayerEmitter(layers, frozen_layers(fraqat_jax.freeze(model, unpack=False) if frozen is None else frozen))
    conv = jaxpr_onnx.Converter(batch_symbol=None if batch_size is not None else b, hooks={LAYER_PREFIX: emitter})
    if batch_size is None:
        first = next(name for (name, _), bat in zip(flat, batched) if bat)
        conv.batch_size = conv.node("Shape", [first], start=0, end=1)
    outs = conv.run(closed.jaxpr, list(closed.consts), [name for name, _ in flat])
    for out, out_name in zip(outs, out_names):
        conv.nodes.append(helper.make_node("Identity", [conv.name(out)], [out_name],
                                           name="output" if out_name == OUTPUT_NAME else f"output_{out_name}"))
    # Graph inputs in the order of the model's call signature (hidden_states, timestep, ...).
    order = list(inspect.signature(type(model).__call__).parameters)
    rank = lambda item: order.index(item[0][0].split(".")[0]) if item[0][0].split(".")[0] in order else len(order)  # noqa: E731
    in_order = sorted(zip(flat, specs), key=rank)
    graph = helper.make_graph(
        conv.nodes, "fraqat_jax_" + type(model).__name__,
        [conv.value_info(name, spec) for (name, _), spec in in_order],
        [conv.value_info(name, aval) for name, aval in zip(out_names, closed.out_avals)],
        initializer=conv.initializers)
    jaxpr_onnx.prune(graph, inputs=False)  # every input of the call stays a graph input
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", jaxpr_onnx.OPSET)],
                              producer_name="fraqat_jax")
    proto.ir_version = 10  # INT4 needs IR 10; the oldest that has it, for older runtimes
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    q_params = sum(int(np.size(layer.kernel[...])) for _, layer in quantized_layers(model) if layer.bits is not None)
    init_bytes = sum(len(t.raw_data) or len(t.SerializeToString()) for t in graph.initializer)
    counts = {
        "opset": jaxpr_onnx.OPSET,
        "inputs": [name for (name, _), _ in in_order],
        "output": OUTPUT_NAME if out_names == [OUTPUT_NAME] else out_names,
        "quantized_layers": len(layers),
        "weight_initializers": emitter.weight_initializers,
        "weight_bytes": emitter.weight_bytes,
        "weight_bytes_bf16": 2 * q_params,
        "initializer_bytes": init_bytes,
        "bf16_bytes": 2 * n_params,
        "bytes_ratio_vs_bf16": init_bytes / max(2 * n_params, 1),
        "act_grid_shift": emitter.grid_shift,
    }
    return QdqGraph(proto, counts, dict(emitter.weight_outputs))


def run_onnx(path: str, inputs: Mapping[str, Any], *, all_optimizations: bool = False) -> np.ndarray:
    """``sample`` of the ONNX file at ``path`` on ``inputs`` with onnxruntime's CPU provider.

    By default with onnxruntime's *basic* graph optimizations (constant folding, no fusions), so the
    graph runs as written. ``all_optimizations=True`` adds the CPU fusions; one of them turns an
    INT4 ``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits``, which is not exact (docs/deploy.md;
    the QDQ pairs of static inputs keep it off).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not all_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = dict(flat_inputs(inputs)[0])
    wanted = {i.name for i in session.get_inputs()}
    return session.run([OUTPUT_NAME], {k: v for k, v in feeds.items() if k in wanted})[0]


def frozen_output(frozen, inputs: Mapping[str, Any]) -> np.ndarray:
    """``frozen(**inputs)`` in JAX (``frozen = fraqat_jax.freeze(model)``): the reference the ONNX
    file must match."""
    graphdef, state = nnx.split(frozen)
    fn = jax.jit(lambda st, kw: nnx.merge(graphdef, st)(**kw))
    return np.asarray(fn(state, jax.tree.map(jnp.asarray, dict(inputs))), np.float32)


def export_onnx(model, inputs: Mapping[str, Any], path: str, *, batch_free: Sequence[str] = BATCH_FREE,
                check: bool = True, reference: np.ndarray | None = None) -> dict:
    """Writes ``model`` (quantized and calibrated) as an ONNX QDQ file at ``path``.

    Args:
      model: a model from ``fraqat_jax.quantize_model`` with calibrated activation ranges
        (``fraqat_jax.calibrate``; a model trained with dynamic ranges is exported with its
        calibrated ones, see :func:`static_view`); it is not changed.
      inputs: keyword arguments of one call, e.g. ``{"hidden_states": [B, C, H, W], "timestep": [B],
        "class_labels": [B]}`` (numpy or JAX arrays): they name the graph inputs and fix every shape
        but axis 0. With ``check`` they are also the held-out inputs of the comparison.
      path: the ``.onnx`` file to write (its directory must exist).
      batch_free: input names without a batch axis.
      check: run ``onnx.checker`` (``full_check``) and onnxruntime, and compare with the frozen
        model (or ``reference``, the expected ``sample`` for ``inputs``).

    Returns a report: ``opset``, ``inputs``, ``output``, ``quantized_layers``,
    ``weight_initializers`` (one per distinct quantized layer), ``weight_bytes`` (codes and
    scales) and ``weight_bytes_bf16`` (those kernels in bf16), ``initializer_bytes`` (the whole
    file's tensors) and ``bf16_bytes`` (all parameters in bf16), ``bytes_ratio_vs_bf16``,
    ``act_grid_shift``, ``file_bytes`` and, with ``check``, ``max_rel_diff``.
    """
    import onnx

    model = static_view(model)
    frozen = fraqat_jax.freeze(model)
    graph = to_onnx(model, inputs, batch_free=batch_free, frozen=frozen)
    proto, report = graph.proto, dict(graph.counts)
    too_big = proto.ByteSize() > 2**31 - 2**24  # protobuf's 2 GiB limit: weights go beside the file
    onnx.save(proto, path, save_as_external_data=too_big, location=os.path.basename(path) + ".data")
    report["path"] = path
    report["file_bytes"] = os.path.getsize(path)
    if check:
        onnx.checker.check_model(path, full_check=True)
        got = run_onnx(path, inputs).astype(np.float64)
        ref = frozen_output(frozen, inputs) if reference is None else np.asarray(reference, np.float64)
        if got.shape != ref.shape:
            raise RuntimeError(f"onnxruntime returned shape {got.shape}, the model {ref.shape}")
        report["max_rel_diff"] = rel_diff(got, ref)
    return report


def export_onnx_run(student, family, held_out, path: str, *, check: bool = True) -> dict:
    """:func:`export_onnx` for the command line: ``held_out`` is one training-style batch (as
    ``fraqat_jax.export.calibration_batches`` returns), turned into the model's keyword arguments by
    its family's ``model_kwargs`` (``family``: the object or its name). ``student`` must hold static
    ranges."""
    family = family_named(family) if isinstance(family, str) else family
    inputs = jax.tree.map(np.asarray, family.model_kwargs(held_out))
    return export_onnx(student, inputs, path, check=check)


def summary(report: dict) -> str:
    """One line for the command line: the file, the error against the frozen model, the sizes."""
    err = report.get("max_rel_diff")
    check = "" if err is None else (f"; max |onnxruntime - frozen| / max |frozen| = {err:.2e} "
                                    f"({'within' if err <= TOLERANCE else 'ABOVE'} {TOLERANCE:g})")
    return (f"wrote {report['path']} (ONNX opset {report['opset']}, QDQ, {report['weight_initializers']} INT4/INT8 "
            f"weight tensors): quantized weights {report['weight_bytes']} bytes = "
            f"{report['weight_bytes'] / max(report['weight_bytes_bf16'], 1):.3f} x bf16, all tensors "
            f"{report['initializer_bytes']} bytes = {report['bytes_ratio_vs_bf16']:.3f} x the bf16 model{check}")
