"""diffusion/: the diffusion model family, what training, evaluation, export, pretraining and
data-free data share. Imports ``family/`` (the interface it implements), ``models/``, ``nn/``,
``data/``, ``quant/`` and ``schedules.py``.

``family``: the five families, one object per model (``DIT``, ``PIXART``, ``SD3``, ``SANA``,
``FLUX``, subclasses of :class:`~fraqat_jax.diffusion.family.DiffusionFamily` carrying their
model's constants), registered through the ``fraqat_jax.families`` entry points. ``teachers``: the
built-in digits DiTs, presets and diffusers folders as teachers. ``grids``: PNG sample grids.

``families``: how each family's model is called (``apply_model``, Flux's 2x2 packing
and ids) and its timestep convention. ``noise``: DDPM and rectified-flow schedules and the training
inputs (``diffusion_inputs``). ``samplers``: DDPM/DDIM/Euler and ``model_sampler`` ("sample this
model from this noise"). ``heldout``: held-out training-style inputs and fixed sampling inputs.
"""

from fraqat_jax.diffusion.families import (apply_model, family_of, model_kwargs, model_time, model_timestep,
                                           objective_of, pack_2x2, sampler_of, unpack_2x2)
from fraqat_jax.diffusion.heldout import heldout_inputs, sampling_inputs, teacher_examples
from fraqat_jax.diffusion.noise import (ddim_timesteps, ddpm_alphas_cumprod, diffusion_inputs, flow_sigmas,
                                        logit_normal_sigmas)
from fraqat_jax.diffusion.samplers import (ddim_sample, ddpm_sample, euler_sample, make_noise, make_sampler,
                                           model_sampler, sample)
from fraqat_jax.diffusion.family import DIT, FAMILIES, FLUX, PIXART, SANA, SD3, DiffusionFamily
from fraqat_jax.diffusion.teachers import BUILTIN_TEACHERS, load_builtin_teacher, save_builtin_teacher

__all__ = [
    "BUILTIN_TEACHERS",
    "DIT",
    "FLUX",
    "PIXART",
    "SANA",
    "SD3",
    "DiffusionFamily",
    "FAMILIES",
    "apply_model",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_alphas_cumprod",
    "ddpm_sample",
    "diffusion_inputs",
    "euler_sample",
    "family_of",
    "flow_sigmas",
    "heldout_inputs",
    "load_builtin_teacher",
    "logit_normal_sigmas",
    "make_noise",
    "make_sampler",
    "model_kwargs",
    "model_sampler",
    "model_time",
    "model_timestep",
    "objective_of",
    "pack_2x2",
    "sample",
    "sampler_of",
    "sampling_inputs",
    "save_builtin_teacher",
    "teacher_examples",
    "unpack_2x2",
]
