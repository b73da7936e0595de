"""The CPU form of a QNN-form graph: each quantized product computed as the frozen JAX student does.

HTP's integer kernels need each product's accumulator requantized to a 16- (or 8-) bit output grid;
the JAX student has no such grid, and onnxruntime's CPU would compute the QDQ graph's ``DQ(x) x
DQ(w)`` as a float matmul of rounded products in its own summation order. :func:`exact_products`
rewrites every ``DQ(Q(x)) -> MatMul <- DQ(W)`` (with any 16-bit carrier of the same grid between
them, and the requantization after it) into what :class:`fraqat_jax.nn.freeze.FrozenLinear` computes
for a static range::

    q_x = clip(round(x * (1 / s_x)) + zero_point)      the codes (fraqat_jax.quant.grid_codes)
    t = (q_x - zero_point) . q_w                        exact: integer-valued float32 sums below 2**24
    y = s_w * (s_x * t)                                 two roundings, in this order

so, for the same input, the CPU graph's codes and product are bit for bit the JAX student's (the
codes by a product with the scale's reciprocal, not ``QuantizeLinear``'s division, because that is
what XLA computes); only the float ops between the products (norms, softmax, activations:
``exp``, ``tanh``, summation orders, and the fused multiply-adds XLA:CPU makes of a product and the
add after it, a bias included) can still differ in their last bits. Written here because no ONNX tool we know of rewrites a QDQ graph into
a given integer arithmetic.
"""

from __future__ import annotations

import numpy as np

from fraqat_jax.export.jaxpr_onnx import prune

__all__ = ["exact_products"]

_EXACT = 2**24  # float32 holds every integer below this


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _grid_quantizer(producer: dict, dq):
    """The outermost ``QuantizeLinear`` of the activation chain ``Q -> DQ [-> Q -> DQ]`` ending at
    ``dq`` (the trained grid; a 16-bit carrier of the same grid may follow it), or ``None``."""
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    while True:
        up = producer.get(q.input[0])
        if up is None or up.op_type != "DequantizeLinear":
            return q
        outer = producer.get(up.input[0])
        if outer is None or outer.op_type != "QuantizeLinear":
            return q
        q = outer


def exact_products(model):
    """A copy of ``model`` (a QNN-form or QDQ graph) with each quantized ``MatMul`` rewritten as the
    module docstring says and the requantization after it (``.out.qnn_q`` / ``.out.qnn_dq``) removed.
    A product is left as it is (float matmul of the dequantized values) when its weight scale is
    per group (blocked) or its sums could reach 2**24 (contraction length x 255 x the largest weight
    code). Returns ``(copy, products rewritten, products left)``."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = _producers(g)
    inits = {t.name: t for t in g.initializer}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    one = "exact_products.one"
    g.initializer.append(numpy_helper.from_array(np.asarray(1.0, np.float32), one))
    rename, done, left = {}, 0, 0
    for n in list(g.node):
        if n.op_type != "MatMul":
            continue
        act, wdq = producer.get(n.input[0]), producer.get(n.input[1])
        if act is None or wdq is None or act.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
            continue
        q = _grid_quantizer(producer, act)
        if q is None or wdq.input[0] not in inits or wdq.input[1] not in inits:
            continue
        codes = numpy_helper.to_array(inits[wdq.input[0]]).astype(np.int64)
        wscale = numpy_helper.to_array(inits[wdq.input[1]])
        if wscale.ndim > 1 or any(a.name == "block_size" and a.i for a in wdq.attribute) \
                or codes.ndim != 2 or codes.shape[0] * 255 * max(int(np.abs(codes).max()), 1) >= _EXACT:
            left += 1
            continue
        tag = n.name or n.output[0]
        c, w, t, ts = (f"{tag}.exact_{k}" for k in ("act", "codes", "sum", "scaled"))
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        zero_init = inits.get(q.input[2]) if len(q.input) > 2 else None
        zero = numpy_helper.to_array(zero_init) if zero_init is not None else np.uint8(0)
        if scale.ndim or np.ndim(zero):
            left += 1
            continue
        limits = np.iinfo(zero.dtype)
        consts = {"inv": np.float32(1.0) / scale, "zero": np.float32(zero),
                  "lo": np.float32(limits.min), "hi": np.float32(limits.max)}
        g.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), f"{tag}.exact_{k}")
                             for k, v in consts.items())
        codes_nodes = [helper.make_node("Mul", [q.input[0], f"{tag}.exact_inv"], [f"{tag}.exact_x"]),
                       helper.make_node("Round", [f"{tag}.exact_x"], [f"{tag}.exact_r"]),
                       helper.make_node("Add", [f"{tag}.exact_r", f"{tag}.exact_zero"], [f"{tag}.exact_q"]),
                       helper.make_node("Clip", [f"{tag}.exact_q", f"{tag}.exact_lo", f"{tag}.exact_hi"],
                                        [f"{tag}.exact_qc"]),
                       helper.make_node("Sub", [f"{tag}.exact_qc", f"{tag}.exact_zero"], [c])]
        for node in codes_nodes:
            node.name = node.output[0]
        y = n.output[0]
        after = consumers.get(y, [])
        if len(after) == 1 and after[0].op_type == "QuantizeLinear" and after[0].name.endswith(".out.qnn_q"):
            (dq,) = consumers[after[0].output[0]]
            g.node.remove(after[0])
            g.node.remove(dq)
            rename[dq.output[0]] = y
        index = list(g.node).index(n)
        g.node.remove(n)
        new = [*codes_nodes, helper.make_node("DequantizeLinear", [wdq.input[0], one], [w], name=w),
               helper.make_node("MatMul", [c, w], [t], name=t),
               helper.make_node("Mul", [t, q.input[1]], [ts], name=ts),
               helper.make_node("Mul", [wdq.input[1], ts], [y], name=f"{tag}.exact_out")]
        for k, node in enumerate(new):
            g.node.insert(index + k, node)
        done += 1
    if any(o.name in rename for o in g.output):
        raise ValueError("a product's requantized output is a graph output")
    for node in g.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    prune(g, inputs=False)
    return out, done, left

