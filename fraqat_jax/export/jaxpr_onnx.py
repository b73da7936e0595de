"""A small jaxpr -> ONNX converter for the float forward passes of our model ports.

Why our own and not ``jax2onnx``: every jax2onnx release from 0.14 to 0.17 declares
``orbax-checkpoint<0.11.37`` (we need >= 0.12) and pulls in equinox, dm-pix, netron,
huggingface-hub and orbax-export; older releases predate the jax/flax versions we need. The ports
use a few dozen primitives, so a converter over exactly those keeps the ``onnx`` extra at
``onnx`` + ``onnxruntime``. It also lets the exporter put the QDQ pattern in place as it walks
the graph (a *hook*, see :class:`Converter`) rather than finding MatMuls in a finished graph.

How it works. ``jax.make_jaxpr`` of the model's call, with a symbolic batch size (``jax.export``
shape polymorphism), gives a jaxpr whose constants are the parameters. :meth:`Converter.run` walks
it once:

* an equation whose inputs are all constants and whose output has no batch axis is *folded*:
  evaluated in JAX now and stored as an initializer (position embeddings, RoPE tables, iota, the
  frequency tables of timestep embeddings);
* ``jit``, ``custom_jvp_call``, ``custom_vjp_call`` and ``checkpoint`` are inlined;
* every other equation becomes ONNX nodes by the rule in ``RULES``. A primitive without a rule
  raises ``NotImplementedError`` naming it.

Values are numpy arrays (constants) or ONNX tensor names. Shapes that contain the batch size
``b`` are built at run time from ``Shape(input)[0]``, so the graph has a dynamic batch dimension.
Opset 21.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 21

_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sin": "Sin", "cos": "Cos", "tanh": "Tanh",
          "logistic": "Sigmoid", "abs": "Abs", "floor": "Floor", "ceil": "Ceil", "sqrt": "Sqrt",
          "erf": "Erf", "sign": "Sign", "not": "Not", "stop_gradient": "Identity", "copy": "Identity",
          "copy_p": "Identity", "optimization_barrier": "Identity"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
           "pow": "Pow", "eq": "Equal", "lt": "Less", "gt": "Greater", "le": "LessOrEqual",
           "ge": "GreaterOrEqual", "and": "And", "or": "Or", "xor": "Xor"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}
_INLINE = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "checkpoint",
           "remat", "custom_lin")


def onnx_dtype(dtype) -> int:
    """The ONNX element type of a numpy / JAX dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _sub_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation, else None."""
    if eqn.primitive.name not in _INLINE:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
            return sub.jaxpr, list(sub.consts)
        return sub, []
    return None


class Converter:
    """Builds one ONNX graph from jaxprs.

    Args:
      batch_symbol: the symbolic dimension (from ``jax.export.symbolic_shape``) of the batch axis.
      hooks: ``{jit name prefix: fn(converter, eqn, inputs) -> outputs}``; a ``jit`` equation whose
        function name starts with a prefix is handed to ``fn`` instead of being inlined (the
        exporter marks each quantized layer this way).
    """

    def __init__(self, batch_symbol=None, hooks: dict[str, Callable] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.batch_symbol = batch_symbol
        self.batch_size: str | None = None  # name of a [1] int64 tensor holding the batch size
        self.hooks = dict(hooks or {})
        self._count = 0
        self._const_names: dict[int, tuple[Any, str]] = {}

    # -- building blocks ----------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name

    def const(self, value, hint: str = "const") -> str:
        """Name of an initializer holding ``value`` (one initializer per numpy array object)."""
        key = id(value)
        if key in self._const_names and self._const_names[key][0] is value:
            return self._const_names[key][1]
        arr = np.asarray(value)
        name = self.add_initializer(numpy_helper.from_array(arr, self.fresh(hint)))
        self._const_names[key] = (value, name)
        return name

    def name(self, value) -> str:
        return value if isinstance(value, str) else self.const(value)

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        """Appends one node; returns its output name (or the list of names when ``n_out > 1``)."""
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        names = ["" if x is None else self.name(x) for x in inputs]
        self.nodes.append(helper.make_node(op, names, outs, name=self.fresh("n_" + op), **attrs))
        return outs[0] if n_out == 1 else outs

    def ints(self, values) -> np.ndarray:
        return np.asarray(list(values), np.int64)

    def dim(self, d):
        """A [1] int64 value holding the size ``d`` (an int or ``k * batch``)."""
        if isinstance(d, (int, np.integer)):
            return self.ints([d])
        k = d // self.batch_symbol if self.batch_symbol is not None else None
        if not isinstance(k, int) or k * self.batch_symbol != d or self.batch_size is None:
            raise NotImplementedError(f"jaxpr->ONNX: dimension {d} is not a multiple of the batch size")
        return self.batch_size if k == 1 else self.node("Mul", [self.batch_size, self.ints([k])])

    def shape(self, dims):
        """An int64 shape value for ``dims`` (a constant when no dimension is symbolic)."""
        if all(isinstance(d, (int, np.integer)) for d in dims):
            return self.ints(dims)
        return self.node("Concat", [self.dim(d) for d in dims], axis=0)

    # -- walking jaxprs -----------------------------------------------------------------------
    def run(self, jaxpr, consts, args) -> list:
        """Converts ``jaxpr`` applied to ``args`` (numpy constants or ONNX names); returns its outputs."""
        env: dict = {}

        def read(v):
            if isinstance(v, jax.extend.core.Literal):
                return np.asarray(v.val, dtype=v.aval.dtype)
            return env[v]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val if isinstance(val, str) else np.asarray(val)
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins) -> list:
        prim = eqn.primitive.name
        if prim in ("jit", "pjit"):
            fname = str(eqn.params.get("name", ""))
            for prefix, hook in self.hooks.items():
                if fname.startswith(prefix):
                    return hook(self, eqn, ins)
        static_out = all(all(isinstance(d, (int, np.integer)) for d in v.aval.shape) for v in eqn.outvars)
        if static_out and all(isinstance(x, np.ndarray) for x in ins):
            return self.fold(eqn, ins)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub[0], sub[1], ins)
        rule = RULES.get(prim)
        if rule is None:
            raise NotImplementedError(
                f"jaxpr->ONNX: primitive {prim!r} has no ONNX conversion (supported: "
                f"{', '.join(sorted(set(RULES) | set(_INLINE)))})"
            )
        out = rule(self, eqn, *ins, **eqn.params)
        return out if isinstance(out, list) else [out]

    def fold(self, eqn, ins) -> list:
        """Evaluates an equation on constants (its result becomes an initializer when used)."""
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*[jnp.asarray(x) for x in ins], **params)
        outs = out if eqn.primitive.multiple_results else [out]
        return [np.asarray(o) for o in outs]

    def value_info(self, name: str, aval, batch_name: str = "batch") -> onnx.ValueInfoProto:
        dims = [d if isinstance(d, (int, np.integer)) else (batch_name if d == self.batch_symbol else None)
                for d in aval.shape]
        return helper.make_tensor_value_info(name, onnx_dtype(aval.dtype), dims)


def prune(graph: onnx.GraphProto, outputs: Sequence[str] | None = None, *, inputs: bool = True) -> None:
    """Drops the nodes and initializers of ``graph`` that no output in ``outputs`` (default: the
    graph's outputs) depends on, and with ``inputs`` the graph inputs that none needs (in place)."""
    need = set(outputs if outputs is not None else [o.name for o in graph.output])
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in need for o in node.output):
            kept.append(node)
            need.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(kept[::-1])
    for field in (graph.initializer, graph.input) if inputs else (graph.initializer,):
        keep = [t for t in field if t.name in need]
        del field[:]
        field.extend(keep)


# ----------------------------------------------------------------------------- rules


def _out_aval(eqn, i=0):
    return eqn.outvars[i].aval


def _unary(op):
    return lambda c, eqn, x, **_: c.node(op, [x])


def _binary(op):
    return lambda c, eqn, x, y, **_: c.node(op, [x, y])


def _ne(c, eqn, x, y, **_):
    return c.node("Not", [c.node("Equal", [x, y])])


def _rsqrt(c, eqn, x, **_):
    return c.node("Reciprocal", [c.node("Sqrt", [x])])


def _square(c, eqn, x, **_):
    return c.node("Mul", [x, x])


def _integer_pow(c, eqn, x, *, y, **_):
    if y == 0:
        return c.node("Expand", [np.ones((), _out_aval(eqn).dtype), c.node("Shape", [x])])
    out = x
    for _ in range(abs(y) - 1):
        out = c.node("Mul", [out, x])
    return c.node("Reciprocal", [out]) if y < 0 else out


def _exp2(c, eqn, x, **_):
    return c.node("Pow", [np.asarray(2.0, _out_aval(eqn).dtype), x])


def _round(c, eqn, x, *, rounding_method, **_):
    if int(rounding_method) != int(jax.lax.RoundingMethod.TO_NEAREST_EVEN):
        raise NotImplementedError("jaxpr->ONNX: round away from zero has no ONNX op (Round is half-to-even)")
    return c.node("Round", [x])


def _select_n(c, eqn, pred, *cases, **_):
    if len(cases) != 2:
        raise NotImplementedError(f"jaxpr->ONNX: select_n with {len(cases)} cases (only 2 are supported)")
    return c.node("Where", [pred, cases[1], cases[0]])


def _clamp(c, eqn, lo, x, hi, **_):
    return c.node("Max", [c.node("Min", [x, hi]), lo])


def _convert(c, eqn, x, *, new_dtype, **_):
    return c.node("Cast", [x], to=onnx_dtype(new_dtype))


def _reshape(c, eqn, x, *, new_sizes, dimensions=None, **_):
    if dimensions is not None:
        x = c.node("Transpose", [x], perm=list(dimensions))
    symbolic = [i for i, d in enumerate(new_sizes) if not isinstance(d, (int, np.integer))]
    if len(symbolic) == 1:  # ONNX infers the one unknown size
        dims = [-1 if i == symbolic[0] else int(d) for i, d in enumerate(new_sizes)]
        return c.node("Reshape", [x, c.ints(dims)])
    return c.node("Reshape", [x, c.shape(new_sizes)])


def _squeeze(c, eqn, x, *, dimensions, **_):
    return c.node("Squeeze", [x, c.ints(dimensions)])


def _expand_dims(c, eqn, x, *, dimensions, **_):
    return c.node("Unsqueeze", [x, c.ints(dimensions)])


def _broadcast_in_dim(c, eqn, x, *, shape, broadcast_dimensions, **_):
    in_shape = eqn.invars[0].aval.shape
    missing = [i for i in range(len(shape)) if i not in broadcast_dimensions]
    if missing:
        x = c.node("Unsqueeze", [x, c.ints(missing)])
    full = [1] * len(shape)
    for src, dst in enumerate(broadcast_dimensions):
        full[dst] = in_shape[src]
    # Expand broadcasts numpy-style: a 1 keeps the input's size, so only grown axes need sizes.
    target = [1 if (f == s) else s for f, s in zip(full, shape)]
    if all(t == 1 for t in target):
        return x
    return c.node("Expand", [x, c.shape(target)])


def _transpose(c, eqn, x, *, permutation, **_):
    return c.node("Transpose", [x], perm=list(permutation))


def _concatenate(c, eqn, *xs, dimension, **_):
    return c.node("Concat", list(xs), axis=int(dimension))


def _stack(c, eqn, *xs, axis, **_):
    return c.node("Concat", [c.node("Unsqueeze", [x, c.ints([axis])]) for x in xs], axis=int(axis))


def _split(c, eqn, x, *, sizes, axis, **_):
    outs = c.node("Split", [x, c.ints(sizes)], n_out=len(sizes), axis=int(axis))
    return outs if len(sizes) > 1 else [outs]


def _slice(c, eqn, x, *, start_indices, limit_indices, strides=None, **_):
    shape = eqn.invars[0].aval.shape
    axes, starts, ends, steps = [], [], [], []
    for ax, (s, e) in enumerate(zip(start_indices, limit_indices)):
        st = 1 if strides is None else int(strides[ax])
        if s == 0 and st == 1 and (e is shape[ax] or e == shape[ax]):
            continue
        if not isinstance(e, (int, np.integer)) or not isinstance(s, (int, np.integer)):
            raise NotImplementedError("jaxpr->ONNX: slice with a symbolic bound along a sliced axis")
        axes.append(ax), starts.append(int(s)), ends.append(int(e)), steps.append(st)
    if not axes:
        return c.node("Identity", [x])
    return c.node("Slice", [x, c.ints(starts), c.ints(ends), c.ints(axes), c.ints(steps)])


def _reduce(op):
    def rule(c, eqn, x, *, axes, **_):
        return c.node(op, [x, c.ints(axes)], keepdims=0)
    return rule


def _dot_general(c, eqn, lhs, rhs, *, dimension_numbers, **_):
    (lc, rc), (lb, rb) = dimension_numbers
    lhs_rank, rhs_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    lf = [i for i in range(lhs_rank) if i not in lc and i not in lb]
    rf = [i for i in range(rhs_rank) if i not in rc and i not in rb]
    if len(lc) == 1 and not lb and rhs_rank == 2:
        # x [..., K] @ W [K, N]: MatMul keeps the lhs's free axes in front (a linear layer).
        lhs = c.node("Transpose", [lhs], perm=lf + list(lc)) if list(lc) != [lhs_rank - 1] else lhs
        rhs = c.node("Transpose", [rhs], perm=[1, 0]) if list(rc) != [0] else rhs
        return c.node("MatMul", [lhs, rhs])
    if len(lc) == 1 and len(lf) == 1 and len(rf) == 1:
        # Batched [B.., M, K] @ [B.., K, N]: attention scores and values.
        lperm, rperm = list(lb) + lf + list(lc), list(rb) + list(rc) + rf
        if lperm != list(range(lhs_rank)):
            lhs = c.node("Transpose", [lhs], perm=lperm)
        if rperm != list(range(rhs_rank)):
            rhs = c.node("Transpose", [rhs], perm=rperm)
        return c.node("MatMul", [lhs, rhs])
    # Any other contraction: [batch.., free.., contracted..] x [batch.., contracted.., free..] as
    # one batched MatMul on flattened axes (no Einsum: QNN HTP refuses it, see export/qnn.py).
    lshape, rshape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    lperm, rperm = list(lb) + lf + list(lc), list(rb) + list(rc) + rf
    if lperm != list(range(lhs_rank)):
        lhs = c.node("Transpose", [lhs], perm=lperm)
    if rperm != list(range(rhs_rank)):
        rhs = c.node("Transpose", [rhs], perm=rperm)
    batch = [lshape[i] for i in lb]
    size = lambda dims: int(np.prod(dims)) if all(isinstance(d, (int, np.integer)) for d in dims) else (  # noqa: E731
        functools.reduce(operator.mul, dims, 1))
    m, k, n = size([lshape[i] for i in lf]), size([lshape[i] for i in lc]), size([rshape[j] for j in rf])
    lhs = c.node("Reshape", [lhs, c.shape(batch + [m, k])])
    rhs = c.node("Reshape", [rhs, c.shape(batch + [k, n])])
    out = c.node("MatMul", [lhs, rhs])
    return c.node("Reshape", [out, c.shape(list(_out_aval(eqn).shape))])


def _conv(c, eqn, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, **_):
    if any(d != 1 for d in lhs_dilation) or batch_group_count != 1:
        raise NotImplementedError("jaxpr->ONNX: transposed or batch-grouped convolutions")
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    x = c.node("Transpose", [lhs], perm=list(lhs_spec))  # -> N, C, spatial...
    w = c.node("Transpose", [rhs], perm=list(rhs_spec))  # -> O, I, spatial...
    pads = [int(p[0]) for p in padding] + [int(p[1]) for p in padding]
    y = c.node("Conv", [x, w], strides=[int(s) for s in window_strides], pads=pads,
               dilations=[int(d) for d in rhs_dilation], group=int(feature_group_count))
    return c.node("Transpose", [y], perm=[list(out_spec).index(i) for i in range(len(out_spec))])


def _gather(c, eqn, operand, indices, *, dimension_numbers, slice_sizes, **_):
    """``operand[indices]`` along one axis (embedding tables, ``x[..., i]``): ONNX Gather."""
    dn = dimension_numbers
    op_shape = eqn.invars[0].aval.shape
    idx_shape = eqn.invars[1].aval.shape
    if isinstance(indices, np.ndarray) and indices.ndim == 1 and not getattr(dn, "operand_batching_dims", ()):
        # One constant start: a static slice (``x[:, 128:]`` under a symbolic batch size).
        if tuple(dn.offset_dims) != tuple(range(len(op_shape) - len(dn.collapsed_slice_dims))):
            raise NotImplementedError(f"jaxpr->ONNX: gather with {dn}")
        axes = list(dn.start_index_map)
        starts = [int(min(max(int(i), 0), op_shape[a] - slice_sizes[a])) for i, a in zip(indices, axes)]
        ends = [st + int(slice_sizes[a]) for st, a in zip(starts, axes)]
        out = c.node("Slice", [operand, c.ints(starts), c.ints(ends), c.ints(axes)])
        if dn.collapsed_slice_dims:
            out = c.node("Squeeze", [out, c.ints(dn.collapsed_slice_dims)])
        return out
    ok = (len(dn.start_index_map) == 1 and tuple(dn.collapsed_slice_dims) == tuple(dn.start_index_map)
          and not getattr(dn, "operand_batching_dims", ()) and idx_shape and idx_shape[-1] == 1)
    axis = dn.start_index_map[0] if ok else None
    if ok:
        ok = all(s == (1 if a == axis else op_shape[a]) for a, s in enumerate(slice_sizes))
        # Gather puts the index axes where the operand's axis was; jax puts them per offset_dims.
        rest = [a for a in range(len(op_shape)) if a != axis]
        n_idx = len(idx_shape) - 1
        expected = tuple(range(axis)) + tuple(range(axis + n_idx, axis + n_idx + len(rest) - axis))
        ok = ok and tuple(dn.offset_dims) == expected and (axis == 0 or n_idx <= 1)
    if not ok:
        raise NotImplementedError(f"jaxpr->ONNX: gather with {dn} on an operand of shape {op_shape}, slice sizes {slice_sizes}, indices {indices if isinstance(indices, np.ndarray) else idx_shape}, {_}")
    idx = c.node("Squeeze", [indices, c.ints([len(idx_shape) - 1])])
    return c.node("Gather", [operand, idx], axis=int(axis))


def _iota(c, eqn, *, dtype, shape, dimension, **_):
    n = shape[dimension]
    r = c.node("Range", [np.asarray(0, np.int64), c.node("Squeeze", [c.dim(n), c.ints([0])]),
                         np.asarray(1, np.int64)])
    r = c.node("Cast", [r], to=onnx_dtype(dtype))
    others = [i for i in range(len(shape)) if i != dimension]
    if others:
        r = c.node("Unsqueeze", [r, c.ints(others)])
    return c.node("Expand", [r, c.shape(shape)])


RULES: dict[str, Callable] = {
    **{k: _unary(v) for k, v in _UNARY.items()},
    **{k: _binary(v) for k, v in _BINARY.items()},
    **{k: _reduce(v) for k, v in _REDUCE.items()},
    "ne": _ne, "rsqrt": _rsqrt, "square": _square, "integer_pow": _integer_pow, "exp2": _exp2,
    "round": _round, "select_n": _select_n, "clamp": _clamp, "convert_element_type": _convert,
    "reshape": _reshape, "squeeze": _squeeze, "expand_dims": _expand_dims,
    "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose, "concatenate": _concatenate,
    "stack": _stack, "split": _split, "slice": _slice, "dot_general": _dot_general,
    "conv_general_dilated": _conv, "gather": _gather, "iota": _iota,
}
