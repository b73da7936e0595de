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

A *prompt cache* (``scripts/cache_latents.py --prompts``, read by ``python -m fraqat_jax.eval
--prompts``) is the same format without ``latents``: the conditioning fields of N evaluation prompts
(``encoder_hidden_states``, ``pooled_projections``, ``encoder_attention_mask``), ``info`` holding
``{"mode": "prompts", "prompts": [N strings], ...}``, and ``DIR/null/``, a one-example cache of the
empty prompt's fields (the unconditional input of classifier-free guidance, as the pipelines'
default negative prompt ``""``). :func:`write_prompts` writes one, :func:`read_prompts` opens one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fraqat_jax.data.sources import ArraySource, DataSourceError

__all__ = ["FORMAT", "LatentsWriter", "PromptCache", "read_latents", "read_prompts", "write_latents", "write_prompts"]

FORMAT = "fraqat-latents-v1"


class LatentsWriter:
    """Writes a cache incrementally: ``w = LatentsWriter(dir, n, fields); w.write(start, rows); w.close()``.

    ``fields`` maps a name to ``(per_example_shape, dtype)``. ``require_latents=False`` writes a
    cache without ``latents`` (a prompt cache, see :func:`write_prompts`).
    """

    def __init__(self, directory: str, num_examples: int, fields: Mapping[str, tuple[tuple[int, ...], Any]],
                 *, info: Mapping[str, Any] | None = None, require_latents: bool = True):
        if require_latents and "latents" not in fields:
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


def _open_cache(directory: str, spec: str, redo: str) -> tuple[dict[str, Any], dict]:
    """The fields of a cache (memory-mapped; float fields read as float32) and its meta.json.

    Raises :class:`DataSourceError` naming ``spec`` for a missing folder or index, a bad index, or
    a field file that is missing or does not match the index."""
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
    return arrays, meta


def read_latents(directory: str, *, seed: int = 0) -> ArraySource:
    """Opens a cache written by :class:`LatentsWriter` as a data source (memory-mapped).

    Raises :class:`DataSourceError` (one line naming ``latents:DIR``) for a missing folder, a folder
    without its ``meta.json`` index (an unfinished cache), a bad index or a field file that is
    missing or does not match the index."""
    spec = f"latents:{directory}"
    redo = "write the cache again (scripts/cache_latents.py) or point data= at a finished one"
    arrays, meta = _open_cache(directory, spec, redo)
    if "latents" not in arrays:
        what = ("it is a prompt cache (cache_latents.py --prompts), read by python -m fraqat_jax.eval --prompts"
                if dict(meta.get("info") or {}).get("mode") == "prompts" else redo)
        raise DataSourceError(spec, f"cannot be opened: meta.json lists no 'latents' field (it has {sorted(arrays)}); {what}")
    src = ArraySource(arrays, seed=seed)
    src.info = meta.get("info", {})
    return src


class PromptCache(NamedTuple):
    """An opened prompt cache: ``cond`` ``{field: [N, ...] array}`` (memory-mapped, floats as
    float32), ``null`` the empty prompt's ``{field: [1, ...]}``, ``prompts`` the N strings and
    ``info`` the cache's free-form info (pipeline, text length, scheduler config...)."""

    cond: dict[str, Any]
    null: dict[str, Any]
    prompts: list[str]
    info: dict[str, Any]


def write_prompts(directory: str, cond: Mapping[str, np.ndarray], null: Mapping[str, np.ndarray],
                  prompts: Sequence[str], *, info: Mapping[str, Any] | None = None) -> None:
    """Writes a prompt cache (see the module docstring): ``cond`` fields ``[N, ...]`` for the N
    ``prompts`` and ``null`` the same fields ``[1, ...]`` for the empty prompt."""
    cond = {k: np.asarray(v) for k, v in cond.items()}
    null = {k: np.asarray(v) for k, v in null.items()}
    if "latents" in cond or set(cond) != set(null):
        raise ValueError(f"a prompt cache needs the same conditioning fields for the prompts and the empty prompt "
                         f"and no 'latents'; got {sorted(cond)} and {sorted(null)}")
    if any(len(v) != len(prompts) for v in cond.values()) or any(len(v) != 1 for v in null.values()):
        raise ValueError(f"{len(prompts)} prompts need fields of {len(prompts)} rows and one empty-prompt row; got "
                         f"{ {k: len(v) for k, v in cond.items()} } and { {k: len(v) for k, v in null.items()} }")
    for sub, arrays, extra in ((os.path.join(directory, "null"), null, {"prompts": [""]}),
                               (directory, cond, {"prompts": list(prompts)})):
        w = LatentsWriter(sub, len(next(iter(arrays.values()))), {k: (v.shape[1:], v.dtype) for k, v in arrays.items()},
                          info={**dict(info or {}), "mode": "prompts", **extra}, require_latents=False)
        w.write(0, arrays)
        w.close()


def read_prompts(directory: str) -> PromptCache:
    """Opens a prompt cache written by :func:`write_prompts`. Raises :class:`DataSourceError`
    (naming ``prompts:DIR``) for anything that is not a complete prompt cache."""
    spec = f"prompts:{directory}"
    redo = "write it with scripts/cache_latents.py --prompts FILE.txt --pipeline DIR --out CACHE"
    cond, meta = _open_cache(directory, spec, redo)
    info = dict(meta.get("info") or {})
    if "latents" in cond or info.get("mode") != "prompts":
        raise DataSourceError(spec, f"is not a prompt cache (info mode {info.get('mode')!r}, fields {sorted(cond)}); {redo}")
    null, _ = _open_cache(os.path.join(directory, "null"), spec + "/null", redo)
    prompts = info.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != int(meta["num_examples"]) or set(null) != set(cond):
        raise DataSourceError(spec, f"is inconsistent: {len(prompts or [])} prompts in meta.json for {meta['num_examples']} "
                                    f"rows, fields {sorted(cond)} and empty-prompt fields {sorted(null)}; {redo}")
    return PromptCache(cond, {k: np.asarray(v[:1]) for k, v in null.items()}, [str(p) for p in prompts], info)
