"""Flax NNX ports of diffusion transformers and VAEs that load diffusers checkpoints, and of
Gemma-2 (transformers ``Gemma2ForCausalLM``, ``models.gemma2``) that loads transformers folders; imports only
``quant/`` and ``parallel/`` (the mesh axis names the attention kernels split over) of the rest of
the package.

- ``MODEL_CLASSES`` (``models.registry``): diffusers ``_class_name`` -> port class. A port is built as
  ``Cls(config, *, rngs, dtype=None, param_dtype=jnp.float32, remat=False)``.
- ``PRESETS``: published sizes, ``name -> (class_name, config)``; ``create(name, rngs=...)``.
- ``from_diffusers(path, *, dtype=None)``: load a diffusers model or pipeline folder.
- ``from_transformers(path, *, dtype=None)``, ``to_transformers_state_dict``, ``save_transformers``:
  transformers folders in and out (``models.transformers_folder``).
- Shared building blocks: ``models.common`` (linear, norms, config), ``models.embeddings``,
  ``models.normalization`` (adaLN), ``models.activations`` (feed-forward), ``models.attention``
  (diffusers' attention module and the one attention dispatch: XLA, TPU flash/splash, cuDNN).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.autoencoder_dc import AutoencoderDC
from fraqat_jax.models.autoencoder_kl import AutoencoderKL
from fraqat_jax.models.common import count_params
from fraqat_jax.models.convert import (CheckpointFileError, CheckpointMismatchError, load_state_dict,
                                       to_diffusers_state_dict)
from fraqat_jax.models.dit import DIT_PRESETS, DiTTransformer2DModel
from fraqat_jax.models.flux import FLUX_PRESETS, FluxTransformer2DModel
from fraqat_jax.models.gemma2 import GEMMA2_PRESETS, Gemma2ForCausalLM, positions_from_mask
from fraqat_jax.models.mmdit import SD3_PRESETS, SD3Transformer2DModel
from fraqat_jax.models.pixart import PIXART_PRESETS, PixArtTransformer2DModel
from fraqat_jax.models.registry import MODEL_CLASSES, from_diffusers, port_class
from fraqat_jax.models.sana import SANA_PRESETS, SanaTransformer2DModel
from fraqat_jax.models.transformers_folder import from_transformers, save_transformers, to_transformers_state_dict
from fraqat_jax.models.vae import load_vae

#: Published sizes, ``name -> (class_name, config)``; each port keeps its own beside its code.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {**DIT_PRESETS, **SD3_PRESETS, **PIXART_PRESETS, **SANA_PRESETS,
                                                  **FLUX_PRESETS, **GEMMA2_PRESETS}


def create(
    preset_or_class: str,
    config: dict[str, Any] | None = None,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
) -> nnx.Module:
    """Randomly initialised port from a preset name (``PRESETS``) or a class name
    (``MODEL_CLASSES``); ``config`` overrides preset keys. Wrap in ``nnx.eval_shape`` for shapes only."""
    if preset_or_class in PRESETS:
        class_name, base = PRESETS[preset_or_class]
    elif preset_or_class in MODEL_CLASSES:
        class_name, base = preset_or_class, {}
    else:
        raise ValueError(
            f"Unknown preset or model class {preset_or_class!r}; presets: {', '.join(sorted(PRESETS))}; "
            f"classes: {', '.join(sorted(MODEL_CLASSES))}"
        )
    cls = MODEL_CLASSES[class_name]
    return cls({**base, **(config or {})}, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)


__all__ = [
    "MODEL_CLASSES",
    "PRESETS",
    "AutoencoderDC",
    "AutoencoderKL",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "DiTTransformer2DModel",
    "FluxTransformer2DModel",
    "Gemma2ForCausalLM",
    "PixArtTransformer2DModel",
    "SD3Transformer2DModel",
    "SanaTransformer2DModel",
    "count_params",
    "create",
    "from_diffusers",
    "from_transformers",
    "load_vae",
    "load_state_dict",
    "port_class",
    "positions_from_mask",
    "save_transformers",
    "to_diffusers_state_dict",
    "to_transformers_state_dict",
]
