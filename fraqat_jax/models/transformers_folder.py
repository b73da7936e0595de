"""transformers model folders (``config.json``, ``*.safetensors`` shards with or without
``model.safetensors.index.json``, tokenizer files) in and out of the NNX language-model ports.

- ``from_transformers(path)``: the port named by ``architectures`` / ``model_type`` in
  ``config.json``, loaded strictly (``models.convert.load_state_dict``: every missing, unexpected
  and mis-shaped key named in one ``CheckpointMismatchError``). Tensors are read with numpy from the
  memory-mapped files; torch is never imported.
- ``to_transformers_state_dict(model)``: ``{transformers key: numpy array}``, the inverse.
- ``save_transformers(model, path, tokenizer_from=...)``: a folder ``from_pretrained`` loads.

A tied model (``tie_word_embeddings``) stores its output projection as the embedding: a
``lm_head.weight`` in the files is skipped on loading (transformers skips it too) and never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fraqat_jax.models.common import Buffer
from fraqat_jax.models.convert import load_checkpoint, load_state_dict, read_config
from fraqat_jax.models.gemma2 import Gemma2ForCausalLM
from fraqat_jax.models.scan import unstack_flat

__all__ = ["TOKENIZER_FILES", "TRANSFORMERS_CLASSES", "from_transformers", "save_transformers",
           "to_transformers_state_dict", "transformers_class"]

#: transformers ``architectures`` name -> port class.
TRANSFORMERS_CLASSES: dict[str, type] = {"Gemma2ForCausalLM": Gemma2ForCausalLM}
_MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM"}
_TIED_KEY = "lm_head.weight"

#: Files of a transformers folder that describe the tokenizer and generation (copied on export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def transformers_class(config: dict[str, Any], source: str = "config.json") -> type:
    """The port for a transformers ``config.json``: its first ``architectures`` entry, else its
    ``model_type``. Raises ``ValueError`` naming what is supported."""
    names = config.get("architectures") or []
    if names and names[0] in TRANSFORMERS_CLASSES:
        return TRANSFORMERS_CLASSES[names[0]]
    if not names and config.get("model_type") in _MODEL_TYPES:
        return TRANSFORMERS_CLASSES[_MODEL_TYPES[config["model_type"]]]
    raise ValueError(f"{source}: unsupported transformers model (architectures={names}, "
                     f"model_type={config.get('model_type')!r}); supported: {', '.join(sorted(TRANSFORMERS_CLASSES))}")


def from_transformers(
    path: str | Path, *, dtype: Any = None, param_dtype: Any = jnp.float32, remat: bool | str = False,
    scan_layers: bool = False, attention: str = "xla",
) -> nnx.Module:
    """Build the port of the transformers model in folder ``path`` and load its weights.

    ``dtype``: compute dtype (None: the parameters'); ``param_dtype``: storage dtype of the loaded
    weights (``jnp.bfloat16`` with ``dtype=jnp.bfloat16`` for an all-bf16 model). The model is built
    abstractly, so no random init is spent. ``remat``, ``scan_layers``, ``attention``: the port's
    options. Raises ``FileNotFoundError`` (no folder, no ``config.json``, no safetensors),
    ``ValueError`` (an unsupported model), ``CheckpointFileError`` (an unreadable file) and
    ``CheckpointMismatchError`` (keys or shapes that do not match the config)."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"transformers model folder not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = read_config(model_dir)
    cls = transformers_class(config, str(model_dir / "config.json"))
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                          remat=remat, scan_layers=scan_layers, attention=attention))
    with load_checkpoint(model_dir) as tensors:
        if abstract.config.get("tie_word_embeddings", True) and _TIED_KEY in tensors:
            tensors = {k: tensors[k] for k in tensors if k != _TIED_KEY}  # views: nothing is read yet
        return load_state_dict(abstract, tensors, source=str(model_dir))


def _key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, "weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def to_transformers_state_dict(model: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
    """``{transformers key: numpy array}`` for every parameter of ``model`` (scanned or not; a
    quantized model gives its float weights, the quantizer state is not part of the format).
    Linear kernels go back to torch's ``[out, in]``. ``dtype``: numpy dtype of every array (e.g.
    ``np.float32``, ``ml_dtypes.bfloat16``); None keeps each parameter's own."""
    out = {}
    for path, var in unstack_flat(model, nnx.to_flat_state(nnx.state(model))):
        if not isinstance(var, (nnx.Param, Buffer)):
            continue
        value = np.asarray(var[...])
        if dtype is not None:
            value = value.astype(dtype)
        if str(path[-1]) == "kernel":
            value = value.T
        out[_key(path)] = np.ascontiguousarray(value)
    return out


def save_transformers(model: nnx.Module, path: str | Path, *, tokenizer_from: str | Path | None = None,
                      dtype: Any = None) -> Path:
    """Write ``model`` as a transformers folder: ``config.json`` (the model's config with
    ``architectures``, ``model_type`` and ``dtype``), ``model.safetensors`` (``format: pt``, as
    ``save_pretrained`` writes it) and, when ``tokenizer_from`` is a folder, its tokenizer and
    generation files (``TOKENIZER_FILES``). ``dtype``: as in :func:`to_transformers_state_dict`.
    Returns the folder."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_transformers_state_dict(model, dtype)
    name = type(model).__name__
    if name not in TRANSFORMERS_CLASSES:
        raise ValueError(f"{name} is not a transformers port; supported: {', '.join(sorted(TRANSFORMERS_CLASSES))}")
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[name]
    # "torch_dtype" is transformers 4's name for "dtype": drop it rather than contradict it
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "torch_dtype"}
    kinds = {np.dtype(v.dtype) for v in tensors.values()}
    stored = "bfloat16" if np.dtype(ml_dtypes.bfloat16) in kinds else str(max(kinds, key=lambda d: d.itemsize))
    config.update(architectures=[name], model_type=model_type, dtype=stored)
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=list)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        if not source.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {source}")
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, out / file)
    return out
