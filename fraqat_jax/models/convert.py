"""Load diffusers checkpoints (``config.json`` + ``*.safetensors``) into the NNX ports.

The mapping is generic and name-based: a port's parameter path equals the diffusers key except
for the leaf, where
- ``kernel`` <- ``weight``, transposed: Linear ``[out, in] -> [in, out]``, Conv2d
  ``OIHW -> HWIO``, Conv1d ``OIW -> WIO``;
- ``scale`` (norms) and ``embedding`` (embedding tables) <- ``weight`` unchanged;
- every other leaf (``bias``, buffers such as ``pos_embed``, ``scale_shift_table``) keeps its name.
Only ``nnx.Param`` and ``Buffer`` leaves are loaded; other state (e.g. bit-widths added by
quantization) is left alone. Loading is strict: missing keys, unexpected keys and shape
mismatches are reported together in one ``CheckpointMismatchError``, before any weight is read.

Files are opened with the ``safetensors`` library (``safe_open``, never torch), which validates each
header (size, JSON, dtypes, shapes against offsets, offsets covering the data exactly); a file it
rejects raises ``CheckpointFileError`` naming the file and, where one is at fault, the tensor.
Tensors are then read one at a time from the memory-mapped file (bfloat16 and float8 through
JAX's dtypes), so a large teacher never needs a second copy of its files in host memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from fraqat_jax.models.common import Buffer
from fraqat_jax.models.scan import restack_flat, unstack_flat

# safetensors dtype -> numpy dtype (bfloat16 and float8 from ml_dtypes, which JAX uses too).
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F32": np.float32, "F64": np.float64, "C64": np.complex64, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header (bytes)


class CheckpointFileError(ValueError):
    """A weights file that cannot be read: not a safetensors file, a corrupt header, truncated data,
    offsets outside the file, or a dtype JAX cannot hold. The message (one line) names the file and,
    where one is at fault, the tensor."""


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


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Lazy read-only ``{tensor name: numpy array}`` over one or more ``.safetensors`` files.

    Opening validates every file with the ``safetensors`` library (``safe_open``: header size,
    JSON, dtypes, shapes against offsets, offsets covering the data exactly), then keeps only the
    validated header. ``ckpt[name]`` is a read-only view of that tensor in the memory-mapped file
    (bfloat16/float8 through ``ml_dtypes``): nothing is copied until the caller copies it, so
    loading a model holds one copy of the weights, not two. Why not the library's readers: its
    numpy reader rejects bfloat16, and its flax reader copies each tensor twice on the host.
    """

    def __init__(self, files: Iterable[str | Path], *, source: str | None = None):
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self._data: dict[Path, np.memmap] = {}
        self._data_start: dict[Path, int] = {}
        for file in map(Path, files):
            header_len = _validated_header_len(file)
            with open(file, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(header_len))  # valid: the library has just checked it
            header.pop("__metadata__", None)
            self._data_start[file] = 8 + header_len
            for name, info in header.items():
                if name in self._entries:
                    raise CheckpointFileError(
                        f"tensor {name!r} is in two files of {source or file.parent}: {self._entries[name][0]} and {file}")
                start, end = info["data_offsets"]
                self._entries[name] = (file, info["dtype"], tuple(info["shape"]), start, end)

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape, start, end = self._entries[name]  # KeyError for an unknown name, as any Mapping
        if dtype not in _DTYPES:
            raise CheckpointFileError(f"{file}: tensor {name!r} has dtype {dtype}, which this loader cannot "
                                      f"read; supported: {', '.join(sorted(_DTYPES))}")
        if end == start:  # an empty tensor: np.memmap cannot map zero bytes
            return np.zeros(shape, _DTYPES[dtype])
        if file not in self._data:
            self._data[file] = np.memmap(file, dtype=np.uint8, mode="r", offset=self._data_start[file])
        return self._data[file][start:end].view(_DTYPES[dtype]).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the header (reads no data)."""
        return self._entries[name][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Drops this object's maps of the files (arrays already handed out keep theirs)."""
        self._data.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _validated_header_len(file: Path) -> int:
    """Validates ``file`` with ``safetensors.safe_open`` and returns its header length (bytes);
    raises ``CheckpointFileError`` naming the file (and the tensor at fault) when it is invalid."""
    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointFileError(f"{file} is not a valid safetensors file: {_one_line(e)}{_blame(file)}") from e
    with open(file, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _blame(file: Path) -> str:
    """`` (tensor NAME: why)`` for the first header entry that does not fit the file, or ``""`` when
    the header itself is unreadable (then no tensor is at fault). Called only after the library
    rejected ``file``; it reads the header alone, bounded by the library's header limit."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                return ""
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return ""
    if not isinstance(header, dict):
        return ""
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return f" (tensor {name!r}: header entry {info!r} needs dtype, shape and data_offsets [start, end])"
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            return f" (tensor {name!r}: bad data_offsets {[start, end]})"
        if end > data_bytes:
            return (f" (tensor {name!r}: data_offsets {[start, end]} reach past the {data_bytes} data bytes "
                    "the file holds: truncated or corrupt)")
        if dtype in _DTYPES and all(isinstance(d, int) for d in shape):
            need = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            if need != end - start:
                return (f" (tensor {name!r}: shape {shape} of {dtype} needs {need} bytes, its data_offsets "
                        f"{[start, end]} hold {end - start})")
    return ""


def read_safetensors(file: str | Path) -> SafetensorsCheckpoint:
    """The tensors of one ``.safetensors`` file, read lazily (see ``SafetensorsCheckpoint``)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"safetensors file not found: {file}")
    return SafetensorsCheckpoint([file])


def pipeline_component(path: str | Path, component: str) -> Path:
    """``path/component`` when ``path`` is a diffusers pipeline folder holding it (it has a
    ``model_index.json``, or no ``config.json`` of its own), else ``path``. No check that either exists."""
    path = Path(path)
    sub = path / component
    if (sub / "config.json").is_file() and (
        (path / "model_index.json").is_file() or not (path / "config.json").is_file()
    ):
        return sub
    return path


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``: ``path`` itself, or its
    ``transformer/`` subfolder when ``path`` is a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers model path does not exist: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"diffusers model path is not a folder: {path}")
    model_dir = pipeline_component(path, "transformer")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (nor in {path / 'transformer'})")
    return model_dir


def load_checkpoint(model_dir: str | Path) -> SafetensorsCheckpoint:
    """Every tensor of the diffusers model in ``model_dir``, read lazily: from the shards named by a
    ``*.safetensors.index.json`` if there is one, else from all ``*.safetensors`` files."""
    model_dir = Path(model_dir)
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        try:
            with open(indexes[0]) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({model_dir / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointFileError(f"{indexes[0]} is not a safetensors index (a JSON object whose "
                                      f"'weight_map' maps tensor names to shard files): {_one_line(e)}") from e
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"shard listed in the index is missing: {file}")
    return SafetensorsCheckpoint(files, source=str(model_dir))


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


def load_state_dict(
    model: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> nnx.Module:
    """Copy diffusers-named ``tensors`` into ``model`` (concrete or from ``nnx.eval_shape``), casting
    to each leaf's dtype. Strict: raises ``CheckpointMismatchError`` listing all missing,
    unexpected and shape-mismatched keys, checked on shapes before any tensor is read (a lazy
    ``SafetensorsCheckpoint`` reads each tensor once, when it is copied). Returns the loaded model
    (a new object)."""
    graphdef, state = nnx.split(model)
    flat = unstack_flat(model, nnx.to_flat_state(state))  # scanned blocks: per-block names
    by_key = {}
    for path, var in _loadable(flat):
        key, transform = _to_diffusers(path, len(var.shape))
        by_key[key] = (path, var, transform)
    missing = sorted(k for k in by_key if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in by_key)
    shape_of = tensors.shape if isinstance(tensors, SafetensorsCheckpoint) else (lambda k: np.shape(tensors[k]))
    mismatched = []
    for key, (path, var, _) in by_key.items():
        if key in tensors:
            have, want = tuple(shape_of(key)), tuple(_expected_shape(var.shape, path))
            if have != want:
                mismatched.append((key, have, want))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, sorted(mismatched), source)
    new_values = {}
    for key, (path, var, transform) in by_key.items():
        # one tensor at a time: the host copy is dropped once it is on the device
        new_values[path] = jnp.asarray(transform(np.asarray(tensors[key])), dtype=var.dtype)
    updated = [(p, v.replace(new_values[p]) if p in new_values else v) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(restack_flat(model, updated)))


def _expected_shape(shape: tuple, path: tuple) -> tuple:
    """Our leaf shape expressed in the checkpoint's layout (what the checkpoint must hold)."""
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
    path = Path(model_dir) / "config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if not isinstance(config, dict):
        raise CheckpointFileError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def to_diffusers_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Inverse of ``load_state_dict``: diffusers-named float32 numpy arrays for every ``nnx.Param``
    and ``Buffer`` (kernels transposed back to torch layout)."""
    out = {}
    for path, var in _loadable(unstack_flat(model, nnx.to_flat_state(nnx.state(model)))):
        key, _ = _to_diffusers(path, len(var.shape))
        value = np.asarray(var[...], dtype=np.float32)
        if str(path[-1]) == "kernel":
            value = {2: lambda a: a.T, 4: lambda a: a.transpose(3, 2, 0, 1), 3: lambda a: a.transpose(2, 1, 0)}[
                value.ndim
            ](value)
        out[key] = np.ascontiguousarray(value)
    return out
