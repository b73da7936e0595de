"""Cached latents and text embeddings on disk (for the text-to-image DiTs).

The VAE and text encoders are not part of a DiT, so text-to-image distillation reads their outputs
from a cache written once. Format of a cache directory ``DIR``::

    DIR/meta.json        {"format": "fraqat-latents-v1", "num_examples": N,
                          "fields": {NAME: {"shape": [...per example...], "dtype": "float16"}, ...},
                          "info": {...free-form: model id, VAE scaling/shift factors, captions file...}}
    DIR/NAME.npy         one numpy .npy per field, leading axis N (read memory-mapped)

Field names are the diffusers model arguments plus ``latents``:

- ``latents``               [N, C, H, W]  VAE latents already scaled (and shifted) the way the
                                           pipeline feeds the transformer
- ``encoder_hidden_states`` [N, L, D]     text-encoder token embeddings
- ``pooled_projections``    [N, D']       pooled text embeddings (SD3, Flux)
- ``class_labels``          [N]           int class ids (class-conditional models)
- any other per-example array is passed through unchanged (e.g. ``encoder_attention_mask``).

Rows are float16 or float32 on disk; the source returns float32 (integers unchanged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fraqat_jax.data.sources import ArraySource, DataSourceError

__all__ = ["FORMAT", "LatentsWriter", "read_latents", "write_latents"]

FORMAT = "fraqat-latents-v1"


class LatentsWriter:
    """Writes a cache incrementally: ``w = LatentsWriter(dir, n, fields); w.write(start, rows); w.close()``.

    ``fields`` maps a name to ``(per_example_shape, dtype)``.
    """

    def __init__(self, directory: str, num_examples: int, fields: Mapping[str, tuple[tuple[int, ...], Any]],
                 *, info: Mapping[str, Any] | None = None):
        if "latents" not in fields:
            raise ValueError(f"a latents cache needs a 'latents' field, got fields {sorted(fields)}")
        os.makedirs(directory, exist_ok=True)
        self.directory, self.num_examples = directory, int(num_examples)
        self.fields = {k: (tuple(int(d) for d in s), np.dtype(t)) for k, (s, t) in fields.items()}
        self.info = dict(info or {})
        self.arrays = {
            k: np.lib.format.open_memmap(os.path.join(directory, f"{k}.npy"), mode="w+", dtype=t,
                                         shape=(self.num_examples, *s))
            for k, (s, t) in self.fields.items()
        }

    def write(self, start: int, rows: Mapping[str, np.ndarray]) -> None:
        if set(rows) != set(self.fields):
            raise ValueError(f"rows must hold exactly the fields {sorted(self.fields)}, got {sorted(rows)}")
        n = {len(v) for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"all fields must have the same number of rows, got { {k: len(v) for k, v in rows.items()} }")
        stop = start + n.pop()
        if start < 0 or stop > self.num_examples:
            raise ValueError(f"rows [{start}, {stop}) fall outside [0, {self.num_examples})")
        for k, v in rows.items():
            if tuple(v.shape[1:]) != self.fields[k][0]:
                raise ValueError(f"field {k!r} rows have shape {tuple(v.shape[1:])}, expected {self.fields[k][0]}")
            self.arrays[k][start:stop] = v

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()
        meta = {"format": FORMAT, "num_examples": self.num_examples,
                "fields": {k: {"shape": list(s), "dtype": t.name} for k, (s, t) in self.fields.items()},
                "info": self.info}
        with open(os.path.join(self.directory, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)  # written last: a cache without meta.json is incomplete


def write_latents(directory: str, arrays: Mapping[str, np.ndarray], *, info: Mapping[str, Any] | None = None) -> None:
    """Writes whole arrays (leading axis = examples) as a cache in one call."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    w = LatentsWriter(directory, n, {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}, info=info)
    w.write(0, arrays)
    w.close()


class _Float32View:
    """Memory-mapped rows cast to float32 on read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, np.dtype(np.float32)

    def __len__(self):
        return len(self.array)

    def __getitem__(self, idx):
        return np.asarray(self.array[idx], dtype=np.float32)


def read_latents(directory: str, *, seed: int = 0) -> ArraySource:
    """Opens a cache written by :class:`LatentsWriter` as a data source (memory-mapped).

    Raises :class:`DataSourceError` (one line naming ``latents:DIR``) for a missing folder, a folder
    without its ``meta.json`` index (an unfinished cache), a bad index or a field file that is
    missing or does not match the index."""
    spec = f"latents:{directory}"
    redo = "write the cache again (scripts/cache_latents.py) or point data= at a finished one"
    if not os.path.isdir(directory):
        raise DataSourceError(spec, f"cannot be opened: no such folder; {redo}")
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataSourceError(spec, "cannot be opened: the folder has no meta.json, the index a cache gets when its writer finishes "
                                    f"(missing or incomplete cache); {redo}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        n, fields = int(meta["num_examples"]), dict(meta["fields"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataSourceError(spec, f"cannot be opened: meta.json is not a {FORMAT} index ({type(e).__name__}: {e}); {redo}") from None
    if n < 1:
        raise DataSourceError(spec, f"cannot be opened: meta.json says num_examples={n}; a cache needs at least one example; {redo}")
    if meta.get("format") != FORMAT:
        raise DataSourceError(spec, f"cannot be opened: meta.json has format {meta.get('format')!r}, expected {FORMAT!r}; {redo}")
    arrays = {}
    for k, field in fields.items():
        path = os.path.join(directory, f"{k}.npy")
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataSourceError(spec, f"cannot be opened: field {k!r} cannot be read from {path} ({type(e).__name__}: {e}); {redo}") from None
        if list(a.shape) != [n, *field["shape"]]:
            raise DataSourceError(spec, f"cannot be opened: field {k!r} has shape {list(a.shape)} in {path}, meta.json says "
                                        f"{[n, *field['shape']]}; {redo}")
        arrays[k] = _Float32View(a) if np.issubdtype(a.dtype, np.floating) else a
    if "latents" not in arrays:
        raise DataSourceError(spec, f"cannot be opened: meta.json lists no 'latents' field (it has {sorted(arrays)}); {redo}")
    src = ArraySource(arrays, seed=seed)
    src.info = meta.get("info", {})
    return src
