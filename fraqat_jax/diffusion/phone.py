"""What a diffusion family tells the pipeline folder of ``export --format qnn``: the sampler, its
settings and the conditioning, in the terms of ``pipeline.json`` (read by ``fraqat_jax.deploy``).

:func:`sampler_settings` gives the scheduler the family is evaluated with (``model_sampler``): DDIM
over diffusers' linear DDPM betas for the epsilon families, the rectified-flow Euler sigmas for the
flow families (``timesteps_per_sigma``: the model timestep per unit of sigma).
:func:`label_settings` names a class-conditional model's label input and its null class.
:class:`TextEncoderGraph`, :class:`TransformerGraph` and :class:`DecoderGraph` are the three
networks of a text-to-image folder as they are traced (their call signatures are the folder's).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.diffusion.families import as_family

__all__ = ["DDIM_SETTINGS", "DecoderGraph", "TextEncoderGraph", "TransformerGraph", "label_settings",
           "sampler_settings", "single_network_settings"]

#: The DDIM schedule of ``model_sampler`` for the epsilon families (``ddpm_alphas_cumprod()``'s defaults).
DDIM_SETTINGS = {"name": "ddim", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                 "beta_schedule": "linear"}


def sampler_settings(family, *, steps: int, guidance: float, shift: float = 1.0,
                     name: str | None = None) -> dict:
    """The manifest's ``sampler``: name, schedule settings, default ``steps`` and ``guidance``.
    ``name`` overrides the flow scheduler (``flow_euler`` or ``flow_dpmsolver++``)."""
    family = as_family(family)
    if family.objective == "ddpm":
        out: dict[str, Any] = dict(DDIM_SETTINGS)
    else:
        out = {"name": name or "flow_euler", "num_train_timesteps": 1000, "shift": float(shift),
               "timesteps_per_sigma": family.timesteps_per_sigma}
    out.update(steps=int(steps), guidance=float(guidance))
    return out


def label_settings(model_config: Mapping[str, Any]) -> dict:
    """The label input of a class-conditional DiT: ``class_labels``, ``num_classes`` and the null
    class (``num_classes``) used for guidance."""
    n = int(model_config["num_embeds_ada_norm"])
    return {"input": "class_labels", "num_classes": n, "null": n}


def single_network_settings(family, model_config: Mapping[str, Any], cfg, sample_shape) -> dict:
    """The manifest keys of a one-network folder: ``conditioning``, ``label`` (class-conditional
    DiT), ``sampler``, ``latent``, ``transformer_io``. A text-conditional family's one network
    says ``"conditioning": "text"`` and names its text inputs; the runner then asks for the text
    encoder the folder lacks."""
    io = {"latent": "hidden_states", "timestep": "timestep", "output": "sample"}
    out: dict[str, Any] = {"sampler": sampler_settings(family, steps=int(cfg.sample_steps),
                                                       guidance=float(cfg.guidance_scale)),
                           "latent": {"shape": [1, *map(int, sample_shape)], "scaling_factor": 1.0}}
    if as_family(family).class_conditional:
        out.update(conditioning="label", label=label_settings(model_config), transformer_io=io)
    else:
        out.update(conditioning="text", transformer_io=dict(io, text="encoder_hidden_states",
                                                            text_mask="encoder_attention_mask"))
    return out


# ----------------------------------------------------------------------------- the text-to-image networks


class TextEncoderGraph(nnx.Module):
    """The text encoder as the pipeline folder runs it: ``(input_ids [1, L] int, attention_mask
    [1, L] float 0/1) -> last hidden state [1, L, D]``. The mask is float so that the graph's only
    boolean tensors are made from it (the QNN form writes them back in float)."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, input_ids, attention_mask):
        return self.lm(input_ids, attention_mask)


class DecoderGraph(nnx.Module):
    """The VAE decoder as the pipeline folder runs it: raw latents ``[1, C, h, w]`` (the sampler's
    latents over ``scaling_factor``, divided on the host) -> images ``[1, 3, H, W]`` in [-1, 1]."""

    def __init__(self, vae):
        self.vae = vae

    def __call__(self, latent):
        return jnp.clip(self.vae.decode(latent), -1.0, 1.0)


class TransformerGraph(nnx.Module):
    """A text-conditional denoiser called as the folder calls it: ``(hidden_states, timestep,
    encoder_hidden_states, encoder_attention_mask)``, the caption mask float 0/1."""

    def __init__(self, model):
        self.model = model

    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask)
