"""A text-to-image teacher's whole pipeline: a diffusers ``SanaPipeline`` folder read and written.

A teacher folder in diffusers' ``SanaPipeline`` layout (``model_index.json``, ``transformer/``,
``vae/`` an ``AutoencoderDC``, ``text_encoder/`` a transformers ``Gemma2Model``, ``tokenizer/``,
``scheduler/`` a ``DPMSolverMultistepScheduler``, and our ``fraqat.json``: text length, null
caption, templates) carries everything a prompt needs on its way to an image.

- :func:`pipeline_folder`: the folder a ``teacher=`` value names, when it is such a pipeline.
- :class:`PromptPipeline`: prompts -> conditioning (the text encoder in JAX, as the pipeline encodes
  them, see ``fraqat_jax.data.captions.PromptEncoder``), the unconditional input of
  classifier-free guidance (the null caption, the pipeline's default negative prompt ``""``),
  the family's sampler with the folder's scheduler settings (flow DPM-Solver++, ``flow_shift``),
  and the DC-AE decode.
- :func:`write_pipeline`: a new pipeline folder: the teacher folder's parts with ``transformer/``
  replaced (what ``export --format diffusers`` writes for such a run).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from fraqat_jax.diffusion.samplers import model_sampler
from fraqat_jax.diffusion.teachers import BUILTIN_TEACHERS

__all__ = ["PIPELINE_PARTS", "PipelineError", "PromptPipeline", "pipeline_folder", "write_pipeline"]

#: The parts a prompt-to-image pipeline folder holds besides ``transformer/``.
PIPELINE_PARTS = ("text_encoder", "tokenizer", "vae", "scheduler")
#: SanaPipeline's own defaults (``num_inference_steps``, ``guidance_scale``) and Sana's flow shift.
PIPELINE_STEPS, PIPELINE_GUIDANCE, PIPELINE_SHIFT = 20, 4.5, 3.0


class PipelineError(ValueError):
    """A teacher that is not a whole prompt-to-image pipeline (the message names what is missing)."""


def _folder_of(teacher: str) -> Path | None:
    if teacher in BUILTIN_TEACHERS:
        return Path(str(importlib.resources.files("fraqat_jax").joinpath("assets", BUILTIN_TEACHERS[teacher])))
    path = Path(teacher)
    if path.name == "transformer" and (path.parent / "model_index.json").is_file():
        return path.parent  # the transformer/ of a pipeline named directly
    return path if (path / "model_index.json").is_file() else None


def pipeline_folder(teacher: str) -> Path:
    """The pipeline folder of ``teacher`` (a built-in name, a pipeline folder or its
    ``transformer/``), with a text encoder, tokenizer, VAE and scheduler. Raises
    :class:`PipelineError` naming the teacher and what it lacks."""
    folder = _folder_of(teacher)
    if folder is None:
        raise PipelineError(f"the run's teacher {teacher!r} is not a pipeline folder (no model_index.json), so it "
                            f"has no text encoder or autoencoder; prompts need a teacher that is a whole pipeline "
                            f"({', '.join(PIPELINE_PARTS)}, e.g. builtin:sana)")
    missing = [part for part in PIPELINE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise PipelineError(f"the run's teacher {teacher!r} ({folder}) has no {', '.join(p + '/' for p in missing)}: "
                            "prompts need a teacher with a text encoder, tokenizer, autoencoder and scheduler")
    return folder


def scheduler_shift(folder: Path) -> float:
    """The flow shift of the folder's ``scheduler/scheduler_config.json`` (``flow_shift``), or Sana's."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return PIPELINE_SHIFT
    return float(config.get("flow_shift", PIPELINE_SHIFT))


class PromptPipeline:
    """The prompt-to-image parts of a pipeline folder (see the module docstring), loaded in JAX, for
    the transformer of diffusion family ``family`` (its sampler samples it).

    ``vae``: a VAE folder to decode with instead of the pipeline's own ``vae/``.
    """

    def __init__(self, folder: str | os.PathLike, family, *, vae: str | None = None):
        from fraqat_jax.data.captions import PromptEncoder, read_extras
        from fraqat_jax.models import load_vae

        self.folder = Path(folder)
        self.family = family
        self.extras = read_extras(self.folder)
        self.encoder = PromptEncoder(self.folder)
        self.vae_dir = Path(vae) if vae else self.folder / "vae"
        self.vae = load_vae(self.vae_dir)
        self.shift = scheduler_shift(self.folder)
        self.null_caption = str(self.extras.get("null_caption", ""))
        self.default_steps, self.default_guidance = PIPELINE_STEPS, PIPELINE_GUIDANCE
        graph, state = nnx.split(self.vae)
        self._vae_state = state
        self._decode = jax.jit(lambda st, z: nnx.merge(graph, st).decode_latents(z))

    def encode(self, prompts) -> dict[str, np.ndarray]:
        """``{"encoder_hidden_states": [B, L, D] float32, "encoder_attention_mask": [B, L] int32}``."""
        hidden, mask = self.encoder(list(prompts))
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.astype(np.int32)}

    def null(self) -> dict[str, np.ndarray]:
        """The unconditional input (the null caption encoded), one row."""
        return self.encode([self.null_caption])

    def latent_shape(self, teacher_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents: the transformer's channels, ``image_size`` / the VAE's factor."""
        size = int(self.extras.get("image_size") or 0) // int(self.vae.spatial_compression_ratio)
        size = size or int(teacher_config.get("sample_size", 32))
        return int(teacher_config.get("in_channels", 4)), size, size

    def sampler(self, build: Callable, *, num_steps: int, guidance_scale: float) -> Callable:
        """Jitted ``(params, noise, cond, key, null_cond) -> latents`` with the family's sampler at the
        folder's flow shift (see ``fraqat_jax.diffusion.model_sampler``)."""
        return model_sampler(build, self.family, num_steps=num_steps, guidance_scale=guidance_scale,
                             shift=self.shift)

    def decode(self, latents) -> np.ndarray:
        """Diffusion-space latents ``[B, C, h, w]`` -> images ``[B, channels, H, W]`` float32."""
        return np.asarray(self._decode(self._vae_state, latents), np.float32)

    def settings(self) -> dict[str, Any]:
        return {"pipeline": str(self.folder), "vae": str(self.vae_dir), "sampler": self.family.sampler,
                "shift": self.shift,
                "max_sequence_length": self.encoder.max_sequence_length, "null_caption": self.null_caption}


def write_pipeline(source: str | os.PathLike, out: str | os.PathLike, write_transformer: Callable[[str], Any]) -> dict:
    """Writes the pipeline folder ``out``: ``model_index.json``, ``fraqat.json`` and the parts of
    ``source`` (:data:`PIPELINE_PARTS`, copied) with ``transformer/`` written by
    ``write_transformer(dir)``. Returns what that returned plus ``pipeline_class``, ``parts`` and
    ``path``."""
    from fraqat_jax.data.captions import EXTRAS_FILE

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for part in PIPELINE_PARTS:
        if (out / part).exists():
            shutil.rmtree(out / part)
        shutil.copytree(source / part, out / part)
    for name in ("model_index.json", EXTRAS_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    info = dict(write_transformer(str(out / "transformer")))
    with open(out / "model_index.json") as f:
        info["pipeline_class"] = json.load(f).get("_class_name")
    return {**info, "parts": list(PIPELINE_PARTS), "path": str(out)}
