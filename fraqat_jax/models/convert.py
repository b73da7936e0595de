"""Load diffusers checkpoints (``config.json`` + ``*.safetensors``) into the NNX ports.

The mapping is generic and name-based: a port's parameter path equals the diffusers key except
for the leaf, where
- ``kernel`` <- ``weight``, transposed: Linear ``[out, in] -> [in, out]``, Conv2d
  ``OIHW -> HWIO``, Conv1d ``OIW -> WIO``;
- ``scale`` (norms) and ``embedding`` (embedding tables) <- ``weight`` unchanged;
- every other leaf (``bias``, buffers such as ``pos_embed``, ``scale_shift_table``) keeps its name.
Only ``nnx.Param`` and ``Buffer`` leaves are loaded; other state (e.g. bit-widths added by
quantization) is left alone. Loading is strict: missing keys, unexpected keys and shape
mismatches are reported together in one ``CheckpointMismatchError``.

Files are read with numpy (memory-mapped; bfloat16 and float8 through ``ml_dtypes``), never torch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fraqat_jax.models.common import Buffer

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys/shapes do not match the model. Attributes ``missing``,
    ``unexpected`` (diffusers key names) and ``mismatched`` (``(key, checkpoint_shape,
    expected_shape)``) list every problem."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]],
                 source: str = "checkpoint"):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            lines.append(
                f"  shape mismatches ({len(mismatched)}): "
                + ", ".join(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
            )
        super().__init__("\n".join(lines))


def read_safetensors(file: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only numpy arrays (memory-mapped)."""
    file = Path(file)
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}; "
                             f"supported: {sorted(_SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        dt = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = data[start:end].view(dt).reshape(info["shape"])
    return out


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path`` itself, or its
    ``transformer/`` subfolder when ``path`` is a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers model path does not exist: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"diffusers model path is not a folder: {path}")
    if (path / "transformer" / "config.json").is_file() and (
        (path / "model_index.json").is_file() or not (path / "config.json").is_file()
    ):
        return path / "transformer"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (nor in {path / 'transformer'})")
    return path


def load_checkpoint(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the diffusers model in ``model_dir``: from the shards named by a
    ``*.safetensors.index.json`` if there is one, else from all ``*.safetensors`` files."""
    model_dir = Path(model_dir)
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        with open(indexes[0]) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"shard listed in the index is missing: {file}")
        for name, value in read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one file of {model_dir}")
            tensors[name] = value
    return tensors


def _to_diffusers(path: tuple, value_ndim: int) -> tuple[str, Any]:
    """diffusers key for an NNX path and the function turning the checkpoint array into ours."""
    *parents, leaf = (str(p) for p in path)
    prefix = ".".join(parents)
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if leaf == "kernel":
        if value_ndim == 2:
            return join("weight"), lambda a: a.T
        if value_ndim == 4:
            return join("weight"), lambda a: a.transpose(2, 3, 1, 0)
        if value_ndim == 3:
            return join("weight"), lambda a: a.transpose(2, 1, 0)
        raise ValueError(f"cannot map a {value_ndim}-D kernel at {'.'.join(map(str, path))}")
    if leaf in ("scale", "embedding"):
        return join("weight"), lambda a: a
    return join(leaf), lambda a: a


def _loadable(flat_state) -> list[tuple[tuple, Any]]:
    return [(p, v) for p, v in flat_state if isinstance(v, (nnx.Param, Buffer))]


def diffusers_key_map(model_or_state: nnx.Module | nnx.State) -> dict[str, tuple]:
    """``{diffusers key: NNX path}`` for every loadable leaf (``nnx.Param`` and ``Buffer``)."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {_to_diffusers(p, len(v.shape))[0]: p for p, v in _loadable(nnx.to_flat_state(state))}


def load_state_dict(
    model: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> nnx.Module:
    """Copy diffusers-named ``tensors`` into ``model`` (concrete or from ``nnx.eval_shape``), casting
    to each leaf's dtype. Strict: raises ``CheckpointMismatchError`` listing all missing,
    unexpected and shape-mismatched keys. Returns the loaded model (a new object)."""
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    by_key = {}
    for path, var in _loadable(flat):
        key, transform = _to_diffusers(path, len(var.shape))
        by_key[key] = (path, var, transform)
    missing = sorted(k for k in by_key if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in by_key)
    mismatched = []
    new_values = {}
    for key, (path, var, transform) in by_key.items():
        if key not in tensors:
            continue
        value = transform(np.asarray(tensors[key]))
        if tuple(value.shape) != tuple(var.shape):
            mismatched.append((key, tuple(np.asarray(tensors[key]).shape), tuple(_expected_shape(var.shape, path))))
            continue
        new_values[path] = jnp.asarray(value, dtype=var.dtype)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, sorted(mismatched), source)
    updated = [(p, v.replace(new_values[p]) if p in new_values else v) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(updated))


def _expected_shape(shape: tuple, path: tuple) -> tuple:
    """Our leaf shape expressed in the checkpoint's layout (for error messages)."""
    if str(path[-1]) == "kernel":
        if len(shape) == 2:
            return (shape[1], shape[0])
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
        if len(shape) == 3:
            return (shape[2], shape[1], shape[0])
    return tuple(shape)


def read_config(model_dir: str | Path) -> dict:
    """The model's ``config.json`` as a dict."""
    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)


def port_class(class_name: str | None) -> type:
    """The port registered for a diffusers ``_class_name``."""
    from fraqat_jax.models import MODEL_CLASSES

    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f"Unsupported diffusers model class {class_name!r}; supported: {', '.join(sorted(MODEL_CLASSES))}"
        )
    return MODEL_CLASSES[class_name]


def from_diffusers(
    path: str | Path, *, dtype: Any = None, param_dtype: Any = jnp.float32, remat: bool = False
) -> nnx.Module:
    """Build the port named by ``_class_name`` in ``config.json`` and load its safetensors.

    ``path``: a diffusers model folder (``config.json`` + ``*.safetensors``, sharded with an
    index file or not) or a pipeline folder (its ``transformer/`` is used). ``dtype``: compute
    dtype (None: follow inputs/params); ``param_dtype``: storage dtype of the loaded weights
    (``jnp.bfloat16`` with ``dtype=jnp.bfloat16`` for an all-bf16 model). The model is built
    abstractly (``nnx.eval_shape``), so no random init is spent on weights that get overwritten.
    """
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    cls = port_class(config.get("_class_name"))
    abstract = nnx.eval_shape(
        lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat)
    )
    return load_state_dict(abstract, load_checkpoint(model_dir), source=str(model_dir))


def to_diffusers_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Inverse of ``load_state_dict``: diffusers-named float32 numpy arrays for every ``nnx.Param``
    and ``Buffer`` (kernels transposed back to torch layout)."""
    out = {}
    for path, var in _loadable(nnx.to_flat_state(nnx.state(model))):
        key, _ = _to_diffusers(path, len(var.shape))
        value = np.asarray(var[...], dtype=np.float32)
        if str(path[-1]) == "kernel":
            value = {2: lambda a: a.T, 4: lambda a: a.transpose(3, 2, 0, 1), 3: lambda a: a.transpose(2, 1, 0)}[
                value.ndim
            ](value)
        out[key] = np.ascontiguousarray(value)
    return out
