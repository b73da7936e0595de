"""Graph surgery of the QNN HTP form (see :mod:`fraqat_jax.export.qnn` for the rules and why):
the host prologue of sin/cos features, rank lowering, conv kernels stored OIHW, boolean masks in
float, and the QDQ node units around each quantized product with calibrated output ranges.

Each function takes and changes an ``onnx.ModelProto``; :func:`to_qnn` applies them in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fraqat_jax.export.jaxpr_onnx import prune
from fraqat_jax.export.onnx import OnnxExportError

LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


def cpu_session(path_or_bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- graph surgery


def _graph_maps(graph):
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def split_prologue(model):
    """``(main, prologue)``: ``prologue`` computes every ``Sin``/``Cos`` of ``model`` from its graph
    inputs (float32, for the CPU); ``main`` takes their outputs as inputs instead. ``prologue`` is
    None when the graph has no Sin/Cos."""
    import onnx
    from onnx import helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    producer, _ = _graph_maps(model.graph)
    cut = [o for n in model.graph.node if n.op_type in ("Sin", "Cos") for o in n.output]
    if not cut:
        return model, None
    # The prologue: the ancestors of the cut tensors (checked to be cheap: no products).
    prologue = onnx.ModelProto()
    prologue.CopyFrom(model)
    del prologue.graph.output[:]
    prologue.graph.output.extend([info[o] for o in cut])
    prune(prologue.graph)
    heavy = sorted({n.op_type for n in prologue.graph.node if n.op_type in ("MatMul", "Conv", "Gemm", "DequantizeLinear")})
    if heavy:
        raise OnnxExportError(f"the sin/cos features depend on {', '.join(heavy)} nodes; the host prologue "
                              "would not be cheap")
    main = onnx.ModelProto()
    main.CopyFrom(model)
    g = main.graph
    keep = [n for n in g.node if not (n.output and n.output[0] in cut)]
    del g.node[:]
    g.node.extend(keep)
    g.input.extend([helper.make_tensor_value_info(o, info[o].type.tensor_type.elem_type,
                                                  [d.dim_value for d in info[o].type.tensor_type.shape.dim])
                    for o in cut])
    prune(main.graph)
    del g.value_info[:]
    return main, prologue


def _static_shapes(model) -> dict[str, list[int]]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[v.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def lower_rank(model, max_rank: int = 5) -> int:
    """Rewrites each ``Reshape -> Transpose -> Reshape`` whose middle tensors have rank >
    ``max_rank`` (unpatchify's ``[B, h, w, p, q, C] -> [B, C, h, p, w, q]``) so that no tensor
    exceeds ``max_rank``: size-1 axes are dropped, then each axis is moved to its place by a
    Reshape to ``[before, axis, between, after]`` and a 4-D Transpose. Returns the number of
    rewritten chains."""
    from onnx import helper, numpy_helper

    g = model.graph
    shapes = _static_shapes(model)
    producer, consumers = _graph_maps(g)
    count = 0
    for t in [n for n in g.node if n.op_type == "Transpose"]:
        x, y = t.input[0], t.output[0]
        if len(shapes.get(x, [])) <= max_rank:
            continue
        first, users = producer.get(x), consumers.get(y, [])
        if first is None or first.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
            continue
        src, last = first.input[0], users[0]
        if len(shapes.get(src, [])) > max_rank or len(shapes.get(last.output[0], [])) > max_rank:
            continue
        dims = shapes[x]
        perm = list(next(a.ints for a in t.attribute if a.name == "perm"))
        live = [a for a in range(len(dims)) if dims[a] != 1]
        order = [a for a in perm if dims[a] != 1]  # target order of the non-unit axes
        cur = list(live)
        nodes, value, k = [], src, 0
        for pos, axis in enumerate(order):
            at = cur.index(axis)
            if at == pos:
                continue
            sizes = [dims[a] for a in cur]
            before, between = int(np.prod(sizes[:pos])), int(np.prod(sizes[pos:at]))
            after = int(np.prod(sizes[at + 1:]))
            shape_name = f"{t.name}_lower_shape_{k}"
            g.initializer.append(numpy_helper.from_array(np.asarray([before, between, dims[axis], after], np.int64),
                                                         shape_name))
            r, tt = f"{t.name}_lower_r{k}", f"{t.name}_lower_t{k}"
            nodes += [helper.make_node("Reshape", [value, shape_name], [r], name=r),
                      helper.make_node("Transpose", [r], [tt], perm=[0, 2, 1, 3], name=tt)]
            value, k = tt, k + 1
            cur = cur[:pos] + [axis] + cur[pos:at] + cur[at + 1:]
        if not nodes:
            nodes = [helper.make_node("Identity", [src], [f"{t.name}_lower_id"], name=f"{t.name}_lower_id")]
            value = nodes[0].output[0]
        last.input[0] = value
        index = list(g.node).index(first)
        for node in (first, t):
            g.node.remove(node)
        for j, node in enumerate(nodes):
            g.node.insert(index + j, node)
        count += 1
    prune(model.graph)
    return count


def fold_weight_transposes(model, weight_outputs: Mapping[str, str]) -> int:
    """A dequantized weight that only feeds a ``Transpose`` (a Conv kernel, HWIO -> OIHW) is stored
    transposed instead (codes, scales and zero points; the DequantizeLinear's axis follows), so
    the ``Conv`` reads the ``DequantizeLinear`` directly, as a QDQ node unit must. Returns the count."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    _, consumers = _graph_maps(g)
    count = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in weight_outputs]:
        users = consumers.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        tr = users[0]
        perm = list(next(a.ints for a in tr.attribute if a.name == "perm"))
        codes = numpy_helper.to_array(inits[dq.input[0]])
        attrs = {a.name: a for a in dq.attribute}
        for name in dq.input[:3]:
            arr = numpy_helper.to_array(inits[name])
            if arr.ndim == codes.ndim:  # codes, and block-wise scales / zero points
                arr = np.ascontiguousarray(np.transpose(arr, perm))
            new = numpy_helper.from_array(arr, name)
            inits[name].CopyFrom(new)
        if "axis" in attrs and numpy_helper.to_array(inits[dq.input[1]]).ndim > 0:
            attrs["axis"].i = perm.index(attrs["axis"].i % codes.ndim)
        for user in consumers.get(tr.output[0], []):
            for j, i in enumerate(user.input):
                if i == tr.output[0]:
                    user.input[j] = dq.output[0]
        g.node.remove(tr)
        count += 1
    return count


def bool_ands_as_products(model) -> int:
    """``And(a, b)`` -> ``Greater(Cast(a) * Cast(b), 0.5)`` in float: QNN HTP fails to add a boolean
    And (attention masks), and onnxruntime's CPU has no boolean Where to write it with."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    ands = [n for n in g.node if n.op_type == "And"]
    if ands:
        g.initializer.append(numpy_helper.from_array(np.asarray(np.float32(0.5)), "qnn_half"))
    for n in ands:
        index = list(g.node).index(n)
        g.node.remove(n)
        a, b, m = (f"{n.name}_{k}" for k in ("a", "b", "m"))
        for j, node in enumerate([helper.make_node("Cast", [n.input[0]], [a], to=TensorProto.FLOAT, name=a),
                                  helper.make_node("Cast", [n.input[1]], [b], to=TensorProto.FLOAT, name=b),
                                  helper.make_node("Mul", [a, b], [m], name=m),
                                  helper.make_node("Greater", [m, "qnn_half"], list(n.output), name=n.name)]):
            g.node.insert(index + j, node)
    return len(ands)


def bool_layout_as_float(model) -> int:
    """Layout ops (Unsqueeze, Transpose, Reshape, ...) of boolean tensors (attention masks) run on
    float copies: HTP holds a boolean as uint8 and fails to prepare a rank-5 uint8 Reshape
    ("could not create op: q::ForceFormat_Crouton"); a Cast back to bool follows, and Cast pairs
    that cancel are removed. Returns the number of layout ops moved to float."""
    from onnx import TensorProto, helper, shape_inference

    g = model.graph
    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    moved = 0
    for n in list(g.node):
        if n.op_type not in LAYOUT_OPS + ("Expand",) or types.get(n.input[0]) != TensorProto.BOOL:
            continue
        index = list(g.node).index(n)
        f_in, f_out, out = f"{n.name}_f_in", f"{n.name}_f_out", n.output[0]
        g.node.insert(index, helper.make_node("Cast", [n.input[0]], [f_in], to=TensorProto.FLOAT, name=f_in))
        n.input[0], n.output[0] = f_in, f_out
        g.node.insert(index + 2, helper.make_node("Cast", [f_out], [out], to=TensorProto.BOOL, name=f"{n.name}_b_out"))
        moved += 1
    # Cast(bool) -> Cast(float): the float value itself (exact, 0 / 1).
    producer, consumers = _graph_maps(g)
    for n in list(g.node):
        src = producer.get(n.input[0]) if n.op_type == "Cast" else None
        if (src is None or src.op_type != "Cast" or next(a.i for a in n.attribute if a.name == "to") != TensorProto.FLOAT
                or next(a.i for a in src.attribute if a.name == "to") != TensorProto.BOOL):
            continue
        for user in consumers.get(n.output[0], []):
            for j, i in enumerate(user.input):
                if i == n.output[0]:
                    user.input[j] = src.input[0]
        g.node.remove(n)
    prune(model.graph)
    return moved


@dataclass
class _Product:
    node: Any  # the MatMul / Conv
    act: str  # its activation input
    act_grid: tuple | None  # (scale name, zero name) of an uint8 DQ upstream (A8), else None (A16)
    direct: bool  # the activation input is that DQ's output


def _products(model, weight_outputs: Mapping[str, str]) -> list[_Product]:
    """The MatMul/Conv nodes that consume a dequantized INT4/INT8 weight, with their activations."""
    producer, _ = _graph_maps(model.graph)
    types = {t.name: t.data_type for t in model.graph.initializer}
    from onnx import TensorProto

    found = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv") or not any(i in weight_outputs for i in n.input[:2]):
            continue
        act = n.input[1] if n.input[0] in weight_outputs else n.input[0]
        v, direct, grid = act, True, None
        while v in producer:
            p = producer[v]
            if p.op_type == "DequantizeLinear":
                if types.get(p.input[2] if len(p.input) > 2 else "", None) == TensorProto.UINT8:
                    grid = (p.input[1], p.input[2])
                break
            if p.op_type not in LAYOUT_OPS:
                break
            v, direct = p.input[0], False
        found.append(_Product(n, act, grid, direct and grid is not None))
    return found


PRODUCT_BITS = (16, 8)  # widths of an A8 product's output the QNN form offers; the first is the default
OUTPUT_MARGIN = 0.25  # calibrated product output ranges are widened by this share of their width on each side


def _range_qdq(lo: float, hi: float, bits: int, margin: float = 0.0):
    """Scale and integer zero point of an unsigned ``bits`` grid covering ``[lo, hi]`` widened by
    ``margin`` x its width on each side, and 0."""
    width = float(hi) - float(lo)
    lo, hi = float(lo) - margin * width, float(hi) + margin * width
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    top = 2**bits - 1
    scale = max(hi - lo, 1e-8) / top
    zero = int(np.clip(np.round(-lo / scale), 0, top))
    return np.float32(scale), (np.uint8 if bits == 8 else np.uint16)(zero)


def quantize_products(model, weight_outputs: Mapping[str, str], calibration: Sequence[Mapping[str, np.ndarray]],
                      product_bits: int = 16) -> dict:
    """Makes each quantized product a whole QDQ node unit (rule 3) and returns counts.

    Before the product, an A8 layer's activation is on its trained uint8 grid: with
    ``product_bits=16`` (default) that grid carried exactly in uint16 (scale / 257, zero x 257: every
    uint8 code ``q`` is the uint16 code ``257 q``, so the values are the trained A8 values); with
    ``product_bits=8`` the uint8 DQ itself (a copy of it after layout ops). A layer without input
    quantization gets a calibrated uint16 grid. After it, a calibrated QuantizeLinear ->
    DequantizeLinear of ``product_bits`` (16 for a 16-bit input: HTP pairs input and output
    widths). ``calibration``: feeds of the graph (min/max over them)."""
    if product_bits not in PRODUCT_BITS:
        raise ValueError(f"product_bits must be one of {PRODUCT_BITS}, got {product_bits!r}")
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    products = _products(model, weight_outputs)
    wanted = sorted({p.node.output[0] for p in products} | {p.act for p in products if p.act_grid is None})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in wanted])
    session = cpu_session(probe.SerializeToString())
    lo = {n: np.inf for n in wanted}
    hi = {n: -np.inf for n in wanted}
    for feeds in calibration:
        for name, value in zip(wanted, session.run(wanted, dict(feeds))):
            lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    _, consumers = _graph_maps(g)
    inits = {t.name: t for t in g.initializer}
    counts = Counter()

    def qdq(value: str, scale, zero, tag: str) -> str:
        s, z = f"{tag}.qnn_scale", f"{tag}.qnn_zero"
        g.initializer.extend([numpy_helper.from_array(np.asarray(scale), s), numpy_helper.from_array(np.asarray(zero), z)])
        q, d = f"{tag}.qnn_q", f"{tag}.qnn_dq"
        return [helper.make_node("QuantizeLinear", [value, s, z], [q], name=q),
                helper.make_node("DequantizeLinear", [q, s, z], [d], name=d)], d

    for p in products:
        node = p.node
        tag = node.name or node.output[0]
        new_before, new_after = [], []
        if p.act_grid is not None and product_bits == 16:
            bits = 16
            s8, z8 = (numpy_helper.to_array(inits[n]) for n in p.act_grid)
            if s8.size != 1:
                raise OnnxExportError(f"{tag}: a per-channel activation grid ({s8.size} scales) has no uint16 copy")
            new_before, d = qdq(p.act, np.float32(s8.reshape(())) / np.float32(257),
                                np.uint16(int(z8.reshape(())) * 257), f"{tag}.act")
            node.input[list(node.input).index(p.act)] = d
            counts["act8_in16"] += 1
        elif p.act_grid is not None:
            bits = 8
            if not p.direct:  # re-quantize the layout ops' output on the same (trained) grid: exact
                s, z = p.act_grid
                q, d = f"{tag}.act_q", f"{tag}.act_dq"
                new_before = [helper.make_node("QuantizeLinear", [p.act, s, z], [q], name=q),
                              helper.make_node("DequantizeLinear", [q, s, z], [d], name=d)]
                counts["act8_requantized"] += 1
                node.input[list(node.input).index(p.act)] = d
        else:
            bits = 16
            scale, zero = _range_qdq(lo[p.act], hi[p.act], 16, OUTPUT_MARGIN)
            new_before, d = qdq(p.act, scale, zero, f"{tag}.act")
            node.input[list(node.input).index(p.act)] = d
            counts["act16"] += 1
        y = node.output[0]
        scale, zero = _range_qdq(lo[y], hi[y], bits, OUTPUT_MARGIN)
        new_after, d = qdq(y, scale, zero, f"{tag}.out")
        for user in consumers.get(y, []):
            for j, i in enumerate(user.input):
                if i == y:
                    user.input[j] = d
        for o in g.output:
            if o.name == y:
                raise OnnxExportError(f"the product {tag} is the graph output")
        index = list(g.node).index(node)
        for j, n in enumerate(new_before):
            g.node.insert(index + j, n)
        index = list(g.node).index(node)
        for j, n in enumerate(new_after):
            g.node.insert(index + 1 + j, n)
        counts[f"out{bits}"] += 1
    counts["products"] = len(products)
    return dict(counts)


def to_qnn(proto, weight_outputs: Mapping[str, str], calibration: Sequence[Mapping[str, np.ndarray]],
           product_bits: int = 16):
    """``(model, prologue, counts)``: the ONNX QDQ export ``proto`` (static batch) in QNN HTP form
    (rules 3-6 of the module doc; 1, 2 and 4 are the exporter's ``batch_size`` and zero points).
    ``calibration``: feeds of ``proto``'s inputs for the product ranges; ``product_bits``: see
    :func:`quantize_products`."""
    main, prologue = split_prologue(proto)
    feeds = [dict(f) for f in calibration]
    if prologue is not None:
        pro = cpu_session(prologue.SerializeToString())
        names = [o.name for o in prologue.graph.output]
        for f in feeds:
            f.update(zip(names, pro.run(names, {i.name: f[i.name] for i in prologue.graph.input})))
    counts = {"lowered_rank": lower_rank(main), "weight_transposes": fold_weight_transposes(main, weight_outputs),
              "and_as_product": bool_ands_as_products(main)}
    counts["bool_layout"] = bool_layout_as_float(main)
    wanted = {i.name for i in main.graph.input}
    counts.update(quantize_products(main, weight_outputs, [{k: v for k, v in f.items() if k in wanted} for f in feeds], product_bits))
    return main, prologue, counts


# ----------------------------------------------------------------------------- fp16 reference

EXACT_IN_FP16 = LAYOUT_OPS + ("Concat", "Slice", "Split", "Expand", "Tile", "Shape", "Cast", "QuantizeLinear",
                              "DequantizeLinear", "Constant")  # Gather is not: HTP reads an fp16 table


def fp16_rounded(model):
    """A copy of the QNN-form ``model`` for onnxruntime's CPU provider in which every float tensor that
    HTP holds in fp16 is rounded to fp16 (a ``Cast`` to float16 and back after the op that makes it,
    and after each float graph input): the outputs of the float ops (norms, softmax, activations,
    residual adds, modulation, attention's float products), but not of the quantized products
    (``DQ -> MatMul/Conv/Gemm -> Q``, integer on HTP), the QDQ nodes, or ops that only move values.

    Its distance from the plain CPU run is what fp16 rounding alone moves the output by (each
    rounding flips some A8 grid points downstream); the export's HTP tolerance is derived from it
    (:func:`fraqat_jax.export.qnn.ort_tolerance`). Written here because onnxruntime's float16
    converters change the graph's types (and QDQ nodes) instead of emulating fp16 storage."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inferred = shape_inference.infer_shapes(out)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    producer, consumers = _graph_maps(graph)

    def quantized_product(node) -> bool:
        return (node.op_type in ("MatMul", "Conv", "Gemm")
                and all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input[:2])
                and all(c.op_type == "QuantizeLinear" for c in consumers.get(node.output[0], [])))

    def rounded(name: str, tag: int) -> tuple[list, str]:
        half, back = f"{name}.fp16_{tag}", f"{name}.fp16r_{tag}"
        return [helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16),
                helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT)], back

    nodes, renamed, outputs = [], {}, {o.name for o in graph.output}
    for tag, value in enumerate(graph.input):
        if types.get(value.name) == TensorProto.FLOAT:
            casts, back = rounded(value.name, tag)
            nodes += casts
            renamed[value.name] = back
    for node in list(graph.node):
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
        nodes.append(node)
        if node.op_type in EXACT_IN_FP16 or quantized_product(node):
            continue
        for name in node.output:
            if types.get(name) == TensorProto.FLOAT and name not in outputs:
                casts, back = rounded(name, len(nodes))
                nodes += casts
                renamed[name] = back
    del graph.node[:]
    graph.node.extend(nodes)
    return out
