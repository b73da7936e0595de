"""Loading a diffusers VAE (``AutoencoderKL`` or ``AutoencoderDC``) and turning decoded images into
uint8 pixels.

Kept apart from the VAE ports so that the ports import nothing of the loader (``models.convert``
looks classes up in the registry, which imports the ports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.convert import pipeline_component
from fraqat_jax.models.registry import from_diffusers

# diffusers classes that load_vae accepts (both registered in models.MODEL_CLASSES).
VAE_CLASS_NAMES = ("AutoencoderKL", "AutoencoderDC")


class NotAVAEError(ValueError):
    """A folder given as a VAE holds another kind of diffusers model."""


def resolve_vae_dir(path: str | Path) -> Path:
    """The folder holding the VAE's ``config.json``: ``path`` itself or, for a pipeline folder
    (``model_index.json``), its ``vae/`` subfolder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"VAE path is not a folder: {path}")
    vae_dir = pipeline_component(path, "vae")
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path} (nor in {path / 'vae'})")
    return vae_dir


def vae_class_name(path: str | Path) -> str:
    """The diffusers ``_class_name`` of the VAE at ``path`` (a ``vae/`` or pipeline folder).
    Raises ``NotAVAEError`` naming the folder's class and the accepted ones when it is not a VAE
    (e.g. a transformer folder), before any weight is read."""
    vae_dir = resolve_vae_dir(path)
    with open(vae_dir / "config.json") as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in VAE_CLASS_NAMES:
        raise NotAVAEError(
            f"{vae_dir} holds a {class_name!r} model, not a VAE; expected one of {', '.join(VAE_CLASS_NAMES)} "
            "(a diffusers pipeline's vae/ folder)"
        )
    return class_name


def load_vae(path: str | Path, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Load a diffusers VAE (``AutoencoderKL`` or ``AutoencoderDC`` port) from a ``vae/`` folder or
    a pipeline folder; ``dtype``/``param_dtype`` as in ``from_diffusers``. Raises ``NotAVAEError``
    (a ``ValueError``) naming both classes when the folder holds another model family."""
    vae_class_name(path)
    return from_diffusers(resolve_vae_dir(path), dtype=dtype, param_dtype=param_dtype)


def images_to_uint8(images: jax.Array) -> jax.Array:
    """Decoded images NCHW in [-1, 1] -> uint8 NHWC ``[B, H, W, C]`` in [0, 255], rounded as
    diffusers' ``VaeImageProcessor.postprocess`` + ``numpy_to_pil`` (``(x/2 + 0.5)`` clipped)."""
    if images.ndim != 4:
        raise ValueError(f"expected NCHW images [B, C, H, W], got shape {tuple(images.shape)}")
    x = jnp.clip(jnp.transpose(images, (0, 2, 3, 1)).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)
