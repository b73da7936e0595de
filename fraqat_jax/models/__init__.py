"""Flax NNX ports of diffusion transformers that load diffusers checkpoints.

- ``MODEL_CLASSES``: diffusers ``_class_name`` -> port class. A port is built as
  ``Cls(config, *, rngs, dtype=None, param_dtype=jnp.float32, remat=False)``.
- ``PRESETS``: published sizes, ``name -> (class_name, config)``; ``create(name, rngs=...)``.
- ``from_diffusers(path, *, dtype=None)``: load a diffusers model or pipeline folder.
- Shared building blocks: ``models.common`` (linear, norms, config), ``models.embeddings``,
  ``models.normalization`` (adaLN), ``models.activations`` (feed-forward), ``models.attention``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.convert import (
    CheckpointFileError,
    CheckpointMismatchError,
    from_diffusers,
    load_state_dict,
    to_diffusers_state_dict,
)
from fraqat_jax.models.autoencoder_dc import AutoencoderDC
from fraqat_jax.models.autoencoder_kl import AutoencoderKL
from fraqat_jax.models.dit import DiTTransformer2DModel
from fraqat_jax.models.common import count_params
from fraqat_jax.models.mmdit import SD3Transformer2DModel
from fraqat_jax.models.flux import FLUX_PRESETS, FluxTransformer2DModel
from fraqat_jax.models.pixart import PIXART_PRESETS, PixArtTransformer2DModel
from fraqat_jax.models.sana import SANA_PRESETS, SanaTransformer2DModel
from fraqat_jax.models.vae import load_vae

# Ports register here (class name must equal the diffusers class name).
MODEL_CLASSES: dict[str, type] = {
    "DiTTransformer2DModel": DiTTransformer2DModel,
    "SD3Transformer2DModel": SD3Transformer2DModel,
}

_DIT_XL_2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}

_SD3_COMMON = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "DiT-XL/2-256": ("DiTTransformer2DModel", {**_DIT_XL_2, "sample_size": 32}),
    "DiT-XL/2-512": ("DiTTransformer2DModel", {**_DIT_XL_2, "sample_size": 64}),
    "SD3-Medium": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 24, "num_attention_heads": 24,
         "caption_projection_dim": 1536, "pos_embed_max_size": 192},
    ),
    "SD3.5-Medium": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 24, "num_attention_heads": 24,
         "caption_projection_dim": 1536, "pos_embed_max_size": 384,
         "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
    ),
    "SD3.5-Large": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 38, "num_attention_heads": 38,
         "caption_projection_dim": 2432, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    ),
}

# Ports of issue 5 (PixArt-Sigma, Sana, FLUX.1) keep their presets beside their code.
MODEL_CLASSES["PixArtTransformer2DModel"] = PixArtTransformer2DModel
MODEL_CLASSES["SanaTransformer2DModel"] = SanaTransformer2DModel
MODEL_CLASSES["FluxTransformer2DModel"] = FluxTransformer2DModel
# VAEs (issue 16): loaded with from_diffusers(vae_dir) or models.vae.load_vae(path).
MODEL_CLASSES["AutoencoderKL"] = AutoencoderKL
MODEL_CLASSES["AutoencoderDC"] = AutoencoderDC
PRESETS.update({**PIXART_PRESETS, **SANA_PRESETS, **FLUX_PRESETS})


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
    "PixArtTransformer2DModel",
    "SD3Transformer2DModel",
    "SanaTransformer2DModel",
    "count_params",
    "create",
    "from_diffusers",
    "load_vae",
    "load_state_dict",
    "to_diffusers_state_dict",
]
