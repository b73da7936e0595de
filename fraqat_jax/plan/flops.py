"""Analytic FLOP counts of a traced JAX function: matrix multiplies and convolutions, loops included.

XLA's ``compiled.cost_analysis()["flops"]`` counts the body of a loop once (``lax.scan`` over layers,
gradient-accumulation scans, FSDP's collective-matmul loops), so it under-counts a scanned model by
its depth. Here the function is traced to a jaxpr (shapes only: no compile, no device memory) and
every ``dot_general`` and ``conv_general_dilated`` is counted from its operand shapes, multiplied by
the trip count of each enclosing ``scan`` (and by the grid of a Pallas kernel). Attention written
as einsums (``jax.nn.dot_product_attention`` with the XLA implementation, Sana's linear attention)
is a pair of ``dot_general`` and is counted the same way.

One multiply-add is 2 FLOPs. Element-wise work (norms, activations, the quantizers, softmax) is not
counted: it is a few percent of a transformer's matmul FLOPs and runs on the vector units, not the
matrix units whose peak the MFU convention divides by.

The FraQAT train step's model FLOPs (:func:`distillation_step_flops`) follow the usual convention:
backward = 2 x forward (gradients with respect to activations and to weights), rematerialisation
not counted (it is hardware work, not model work).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["count_flops", "distillation_step_flops", "jaxpr_flops"]


def _dot_general_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs.shape[d] for d in lhs_contract)
    batch = math.prod(lhs.shape[d] for d in lhs_batch)
    lhs_free = math.prod(s for d, s in enumerate(lhs.shape) if d not in lhs_contract and d not in lhs_batch)
    rhs_batch = eqn.params["dimension_numbers"][1][1]
    rhs_free = math.prod(s for d, s in enumerate(rhs.shape) if d not in rhs_contract and d not in rhs_batch)
    return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
    """2 x (output elements) x (kernel window x input channels per group)."""
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims) of the kernel
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_per_group = rhs.shape[rhs_spec[1]]
    return 2 * math.prod(out.shape) * window * in_per_group


def _sub_jaxprs(value):
    """Jaxprs held in one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _pallas_grid_size(eqn) -> int:
    grid_mapping = eqn.params.get("grid_mapping")
    grid = getattr(grid_mapping, "grid", ()) or ()
    return math.prod(int(g) for g in grid) if grid else 1


def jaxpr_flops(jaxpr) -> int:
    """FLOPs of one run of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``), loop bodies times their trip count.

    ``cond`` counts its most expensive branch; a ``while`` loop (unknown trip count) counts its body
    once. Any other primitive that holds jaxprs (``pjit``, remat, custom_vjp/jvp calls, shard_map)
    counts them once each.
    """
    if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0)
        elif name == "scan":
            total += int(eqn.params["length"]) * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "pallas_call":
            total += _pallas_grid_size(eqn) * jaxpr_flops(eqn.params["jaxpr"])
        else:
            # custom_vjp keeps its backward rule as a thunk, not a jaxpr: only the forward is counted.
            for key, value in eqn.params.items():
                if key in ("fwd_jaxpr_thunk", "bwd", "jvp_jaxpr_fun", "jvp_jaxpr_thunk"):
                    continue
                for sub in _sub_jaxprs(value):
                    total += jaxpr_flops(sub)
    return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``fn(*args, **kwargs)``; arguments may be ``jax.ShapeDtypeStruct`` (nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def distillation_step_flops(teacher_forward: int, student_forward: int) -> int:
    """Model FLOPs of one distillation update: teacher forward + student forward and backward (2x)."""
    return int(teacher_forward) + 3 * int(student_forward)
