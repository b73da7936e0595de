"""Device mesh from ``data=N,fsdp=M,tensor=K`` and logical-axis sharding of parameters and batches.

Parameters carry logical axis names (nnx metadata ``sharding_names``, e.g. ``("embed", "mlp")``);
:data:`LOGICAL_RULES` maps each name to a mesh axis, as MaxText and maxdiffusion do. A dimension is
only sharded when the mesh axis size divides it (else it is replicated), and a parameter without
names is sharded FSDP-style along its largest dimension that ``fsdp`` divides. Batches are sharded
over ``("data", "fsdp")`` on their leading axis.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "BATCH_AXES", "HEAD_AXES", "LOGICAL_RULES", "MeshError", "batch_sharding", "build_mesh",
           "dividing_axes", "param_spec", "parse_mesh", "names_of", "place", "replicated", "shard_params",
           "state_shardings", "variable_sharding"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch (and an attention kernel's batch axis) is split over
HEAD_AXES = ("tensor",)  # the mesh axes attention heads (logical "heads") are split over

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", HEAD_AXES[0]),
    ("kv", None),
    ("head_dim", None),
    ("norm", None),
    ("vocab", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


class MeshError(ValueError):
    """A mesh spec that does not parse or does not match the devices."""


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2, "tensor": 1}``; empty spec: all devices on data.

    The product of the sizes must equal ``num_devices``; one size may be ``-1`` (fill in the rest).
    """
    sizes = {a: 1 for a in AXES}
    if not spec.strip():
        sizes["data"] = num_devices
        return sizes
    seen, fill = set(), None
    for part in spec.split(","):
        if "=" not in part:
            raise MeshError(f"mesh part {part!r} is not AXIS=SIZE (axes: {', '.join(AXES)}), in --mesh {spec!r}")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in AXES:
            raise MeshError(f"unknown mesh axis {name!r} in --mesh {spec!r}; allowed axes: {', '.join(AXES)}")
        if name in seen:
            raise MeshError(f"mesh axis {name!r} given twice in --mesh {spec!r}")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"mesh size {value!r} for axis {name!r} is not an integer") from None
        if size == -1 and fill is None:
            fill = name
            continue
        if size < 1:
            raise MeshError(f"mesh size {size} for axis {name!r} is not allowed: use a positive integer (or one -1)")
        sizes[name] = size
    known = math.prod(sizes[a] for a in AXES if a != fill)
    if fill is not None:
        if num_devices % known:
            raise MeshError(f"--mesh {spec!r}: {num_devices} devices are not divisible by {known}")
        sizes[fill] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"--mesh {spec!r} has {math.prod(sizes.values())} devices but there are {num_devices}; "
                        f"the sizes must multiply to {num_devices}")
    return sizes


def build_mesh(spec: str = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # some topologies refuse a shape; a plain reshape is always valid
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def dividing_axes(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes of ``mesh`` among ``names`` (in mesh order) whose sizes multiply to a divisor of ``size``."""
    axes, product = [], 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if name in names and n > 1 and size % (product * n) == 0:
            axes.append(name)
            product *= n
    return tuple(axes)


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def param_spec(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
               rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
    """The PartitionSpec for one parameter from its logical axis names (see the module docstring)."""
    table = dict(rules)
    if names is not None and len(names) == len(shape):
        out, used = [], set()
        for dim, name in zip(shape, names):
            axis = table.get(name) if name is not None else None
            axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
            if axes and not used.intersection(axes) and dim % _axis_size(mesh, axis) == 0 and _axis_size(mesh, axis) > 1:
                out.append(axis)
                used.update(axes)
            else:
                out.append(None)
        return P(*out)
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and len(shape) >= 1:
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if shape[i] % fsdp == 0:
                spec = [None] * len(shape)
                spec[i] = "fsdp"
                return P(*spec)
    return P()


def names_of(variable) -> tuple | None:
    """The logical axis names a parameter carries in its metadata, or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("sharding_names", "sharding", "out_sharding"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def variable_sharding(variable, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> NamedSharding:
    """The NamedSharding of one ``nnx.Variable`` from its shape and logical axis names."""
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    return NamedSharding(mesh, param_spec(np.shape(value), names_of(variable), mesh, rules))


def shard_params(state, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """NamedShardings for an ``nnx.State`` (a pytree of the same structure, leaves NamedSharding)."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh) -> dict:
    """A pure dict (like ``nnx.to_pure_dict(state)``) of NamedShardings by logical-axis rules."""
    root: dict = {}
    for path, v in nnx.to_flat_state(state):
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = variable_sharding(v, mesh)
    return root


def place(tree, shardings, *, abstract: bool = False):
    """Global arrays (or, ``abstract``, their ShapeDtypeStructs) from host values identical on every
    process, laid out by ``shardings`` (a pytree of NamedShardings of the same structure)."""
    def one(x, s):
        if abstract:
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)
