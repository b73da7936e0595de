"""How each diffusion family's model is called and its timestep convention, read from the family
object (:mod:`fraqat_jax.diffusion.family`: one class per model, its constants as attributes).

======  =============================  ==========================  =================================
family  class                          training objective          timestep the model receives
======  =============================  ==========================  =================================
dit     DiTTransformer2DModel          DDPM (epsilon + variance)   integer DDPM step, float32
pixart  PixArtTransformer2DModel       DDPM (epsilon + variance)   integer DDPM step, float32
sd3     SD3Transformer2DModel          rectified flow              1000 * sigma
sana    SanaTransformer2DModel         rectified flow              1000 * sigma
flux    FluxTransformer2DModel         rectified flow, 2x2 packed  sigma (the model scales by 1000)
======  =============================  ==========================  =================================

The samplers work in *sampler time*: the DDPM step for DDPM families and ``1000 * sigma`` for
rectified flow (as diffusers' schedulers pass it to SD3). A family's ``timesteps_per_sigma`` says
how its model timestep relates to sigma. Every function takes a family object or a family's name.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from fraqat_jax.family import family_for_model, family_named

__all__ = ["SAMPLER_TIMESTEPS_PER_SIGMA", "apply_model", "as_family", "family_of", "flux_ids", "model_kwargs",
           "model_time", "model_timestep", "objective_of", "pack_2x2", "sampler_of", "unpack_2x2"]

SAMPLER_TIMESTEPS_PER_SIGMA = 1000.0


def as_family(family):
    """A diffusion family object from itself or its name."""
    return family_named(family) if isinstance(family, str) else family


def family_of(model):
    """The family object of a port instance (or of its class name)."""
    return family_for_model(model)


def objective_of(family) -> str:
    """``"ddpm"`` (epsilon prediction) or ``"flow"`` (rectified-flow velocity)."""
    return as_family(family).objective


def sampler_of(family) -> str:
    """The deterministic sampler used to evaluate a family: DDIM for DDPM models, Euler for flow."""
    return as_family(family).sampler


def model_timestep(family, sigma):
    """A flow family's model timestep for noise level ``sigma`` (float32 ``(B,)``)."""
    per_sigma = as_family(family).timesteps_per_sigma
    return sigma if per_sigma == 1.0 else sigma * per_sigma


def model_time(family, t):
    """Sampler time ``t`` (DDPM step or ``1000 * sigma``) -> the family's model timestep."""
    fam = as_family(family)
    if fam.objective == "ddpm":
        return t
    return t / (SAMPLER_TIMESTEPS_PER_SIGMA / fam.timesteps_per_sigma)

def pack_2x2(x):
    """Flux packing: [B, C, H, W] -> [B, (H/2)(W/2), 4C] (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(x, shape):
    """Inverse of :func:`pack_2x2` for an unpacked ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    x = x.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def flux_ids(h: int, w: int, text_len: int):
    """Flux position ids: image ``[(H/2)(W/2), 3]`` (0, row, column) and text ``[text_len, 3]`` zeros."""
    img = np.zeros((h // 2, w // 2, 3), np.float32)
    img[..., 1] = np.arange(h // 2)[:, None]
    img[..., 2] = np.arange(w // 2)[None, :]
    return jnp.asarray(img.reshape(-1, 3)), jnp.zeros((text_len, 3), jnp.float32)


def model_kwargs(family, x, timestep, cond: Mapping[str, Any]) -> dict:
    """Keyword arguments of the diffusers-style ``__call__`` for noisy ``x`` [B, C, H, W].

    ``timestep`` is in the family's convention (see the module docstring); ``cond`` holds the
    batch's conditioning fields, passed through by name.
    """
    kw = dict(cond)
    if as_family(family).packed_2x2:
        _, _, h, w = x.shape
        text_len = cond["encoder_hidden_states"].shape[1]
        img_ids, txt_ids = flux_ids(h, w, text_len)
        kw.update(hidden_states=pack_2x2(x), timestep=timestep, img_ids=img_ids, txt_ids=txt_ids)
        return kw
    kw.update(hidden_states=x, timestep=timestep)
    return kw


def apply_model(model, family, x, t_model, cond):
    """Runs ``model`` on noisy ``x`` [B, C, H, W]; returns [B, C_out, H, W] (Flux unpacked)."""
    out = model(**model_kwargs(family, x, t_model, cond))
    if as_family(family).packed_2x2:
        out = unpack_2x2(out, x.shape)
    return out
