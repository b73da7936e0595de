"""The registry of ports: diffusers ``_class_name`` (or transformers architecture) -> port class, and
loading a diffusers folder (transformers folders: ``models.transformers_folder``).

A port is built as ``Cls(config, *, rngs, dtype=None, param_dtype=jnp.float32, remat=False)``
(transformers also take ``scan_layers`` and ``attention``); its class name equals the diffusers one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.autoencoder_dc import AutoencoderDC
from fraqat_jax.models.autoencoder_kl import AutoencoderKL
from fraqat_jax.models.convert import load_checkpoint, load_state_dict, read_config, resolve_model_dir
from fraqat_jax.models.dit import DiTTransformer2DModel
from fraqat_jax.models.flux import FluxTransformer2DModel
from fraqat_jax.models.gemma2 import Gemma2ForCausalLM
from fraqat_jax.models.mmdit import SD3Transformer2DModel
from fraqat_jax.models.pixart import PixArtTransformer2DModel
from fraqat_jax.models.sana import SanaTransformer2DModel

__all__ = ["MODEL_CLASSES", "from_diffusers", "port_class"]

MODEL_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (DiTTransformer2DModel, SD3Transformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel,
                FluxTransformer2DModel, AutoencoderKL, AutoencoderDC, Gemma2ForCausalLM)
}


def port_class(class_name: str | None) -> type:
    """The port registered for a diffusers ``_class_name``."""
    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f"Unsupported diffusers model class {class_name!r}; supported: {', '.join(sorted(MODEL_CLASSES))}"
        )
    return MODEL_CLASSES[class_name]


def from_diffusers(
    path: str | Path, *, dtype: Any = None, param_dtype: Any = jnp.float32, remat: bool | str = False,
    scan_layers: bool = False, attention: str = "xla",
) -> nnx.Module:
    """Build the port named by ``_class_name`` in ``config.json`` and load its safetensors.

    ``path``: a diffusers model folder (``config.json`` + ``*.safetensors``, sharded with an
    index file or not) or a pipeline folder (its ``transformer/`` is used). ``dtype``: compute
    dtype (None: follow inputs/params); ``param_dtype``: storage dtype of the loaded weights
    (``jnp.bfloat16`` with ``dtype=jnp.bfloat16`` for an all-bf16 model). The model is built
    abstractly (``nnx.eval_shape``), so no random init is spent on weights that get overwritten.
    ``remat``, ``scan_layers``, ``attention``: the port's options (``models.scan``, ``models.attention``).
    """
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    cls = port_class(config.get("_class_name"))
    options = {"remat": remat}  # the VAEs take remat only: pass the transformer options when set
    if scan_layers:
        options["scan_layers"] = True
    if attention != "xla":
        options["attention"] = attention
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, **options))
    with load_checkpoint(model_dir) as tensors:
        return load_state_dict(abstract, tensors, source=str(model_dir))
