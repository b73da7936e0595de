"""What a diffusion family tells the pipeline folder of ``export --format qnn``: the sampler, its
settings and the conditioning, in the terms of ``pipeline.json`` (read by ``fraqat_jax.deploy``).

:func:`sampler_settings` gives the scheduler the family is evaluated with (``model_sampler``): DDIM
over diffusers' linear DDPM betas for the epsilon families, the rectified-flow Euler sigmas for the
flow families (``timesteps_per_sigma``: the model timestep per unit of sigma).
:func:`label_settings` names a class-conditional model's label input and its null class.
:class:`TextEncoderGraph`, :class:`TransformerGraph` and :class:`DecoderGraph` are the three
networks of a text-to-image folder as they are traced (their call signatures are the folder's);
:func:`pipeline_components` gathers them, with the tokenizer, text length, sampler, latent shape and
prompts, from a run whose teacher is a whole ``SanaPipeline`` folder.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from fraqat_jax.diffusion.families import as_family
from fraqat_jax.family import CapabilityError, PipelineComponents

__all__ = ["DDIM_SETTINGS", "DecoderGraph", "TextEncoderGraph", "TransformerGraph", "label_settings",
           "pipeline_components", "pipeline_prompts", "sampler_settings", "single_network_settings"]

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


# ----------------------------------------------------------------------------- a run's pipeline

#: The manifest's scheduler for each flow family's evaluation sampler.
_FLOW_SCHEDULERS = {"flow_dpm": "flow_dpmsolver++", "euler": "flow_euler"}


def pipeline_prompts(templates, *, seed: int = 0) -> list[str]:
    """Every caption of ``templates`` (``{word}`` / ``{numeral}``) for the ten digits, in an order
    drawn with ``seed``: any prefix spreads over digits and templates."""
    import numpy as np

    from fraqat_jax.data.captions import caption

    captions = [caption(t, d) for t in templates for d in range(10)]
    return [captions[i] for i in np.random.default_rng(seed).permutation(len(captions))]


def pipeline_components(family, cfg, student) -> PipelineComponents:
    """The text-to-image phone pipeline of a run whose teacher is a whole pipeline folder
    (``fraqat_jax.diffusion.pipeline``): its text encoder and DC-AE decoder as the folder ships
    them, the trained ``student`` as the transformer, the tokenizer and text length of the prompt
    encoding, the family's sampler at the folder's flow shift with the pipeline's default steps and
    guidance, the training captions (calibration) and the held-out ones (agreement).
    :class:`~fraqat_jax.family.CapabilityError` when the teacher is no such folder."""
    from fraqat_jax.diffusion.pipeline import PipelineError, PromptPipeline, pipeline_folder

    family = as_family(family)
    try:
        folder = pipeline_folder(cfg.teacher)
    except PipelineError as e:
        raise CapabilityError(f"family {family.name!r} cannot export a text-to-image phone pipeline: {e}") from None
    pipe = PromptPipeline(folder, family)
    pad_id = pipe.encoder.tokenizer.token_to_id("<pad>")
    templates = pipe.extras.get("templates") or {}
    if not templates.get("train") or not templates.get("heldout"):
        raise CapabilityError(f"family {family.name!r} cannot export a phone pipeline from {str(folder)!r}: its "
                              "fraqat.json lists no train and heldout caption templates (calibration and agreement "
                              "prompts)")
    sampler = sampler_settings(family, steps=pipe.default_steps, guidance=pipe.default_guidance, shift=pipe.shift,
                               name=_FLOW_SCHEDULERS.get(family.sampler))
    return PipelineComponents(
        text_encoder=TextEncoderGraph(pipe.encoder.model), transformer=TransformerGraph(student),
        vae_decoder=DecoderGraph(pipe.vae), tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
        text_length=int(pipe.encoder.max_sequence_length), pad_id=int(pad_id), lowercase=True, sampler=sampler,
        latent_shape=(1, *pipe.latent_shape(dict(student.config))),
        prompts=pipeline_prompts(templates["train"]), heldout_prompts=pipeline_prompts(templates["heldout"], seed=1))
