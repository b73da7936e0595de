"""Teacher loading, the quantized student copy, and how each model family is called and trained.

Families (picked from the teacher's class):

======  =============================  ==========================  =================================
family  class                          training inputs             timestep the model receives
======  =============================  ==========================  =================================
dit     DiTTransformer2DModel          DDPM (epsilon + variance)   integer DDPM step, float32
pixart  PixArtTransformer2DModel       DDPM (epsilon + variance)   integer DDPM step, float32
sd3     SD3Transformer2DModel          rectified flow              1000 * sigma
sana    SanaTransformer2DModel         rectified flow              1000 * sigma
flux    FluxTransformer2DModel         rectified flow, 2x2 packed  sigma (the model scales by 1000)
======  =============================  ==========================  =================================
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["BUILTIN_TEACHER", "FAMILIES", "family_of", "init_preset", "load_builtin_teacher", "load_teacher",
           "make_student", "model_kwargs", "objective_of", "save_builtin_teacher"]

FAMILIES = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "SanaTransformer2DModel": "sana",
    "FluxTransformer2DModel": "flux",
}
BUILTIN_TEACHER = "digits_dit"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def family_of(model) -> str:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"teacher class {name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def objective_of(family: str) -> str:
    return "ddpm" if family in ("dit", "pixart") else "flow"


def _asset_dir() -> str:
    return str(importlib.resources.files("fraqat_jax").joinpath("assets", BUILTIN_TEACHER))


def save_builtin_teacher(model, directory: str | None = None) -> str:
    """Writes a model as a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    loadable by ``fraqat_jax.models.from_diffusers`` and by diffusers itself."""
    from safetensors.numpy import save_file

    from fraqat_jax.models import to_diffusers_state_dict

    directory = directory or _asset_dir()
    os.makedirs(directory, exist_ok=True)
    save_file(to_diffusers_state_dict(model), os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": type(model).__name__, **dict(model.config)}, f, indent=1, sort_keys=True)
    return directory


def load_builtin_teacher(*, dtype=None, param_dtype=jnp.float32):
    """The shipped tiny class-conditional DiT trained on the digits (``python -m fraqat_jax.pretrain``)."""
    from fraqat_jax.models import from_diffusers

    directory = _asset_dir()
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"the built-in teacher is missing ({directory}); run python -m fraqat_jax.pretrain")
    return from_diffusers(directory, dtype=dtype, param_dtype=param_dtype)


def init_preset(name: str, overrides: Mapping[str, Any] | None = None, *, seed: int = 0, dtype=None,
                param_dtype=jnp.float32, remat: bool = False):
    """A preset model with random weights, initialised in one jitted call (not op by op)."""
    from fraqat_jax import models

    if name not in models.PRESETS:
        raise ValueError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
    cls_name, config = models.PRESETS[name]
    cls = models.MODEL_CLASSES[cls_name]
    config = {**config, **dict(overrides or {})}

    def build():
        return cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, remat=remat)

    graph = nnx.graphdef(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()))()
    return nnx.merge(graph, state)


def load_teacher(cfg) -> nnx.Module:
    """The teacher named by ``cfg.teacher`` (see the config help)."""
    dtype = _DTYPES[cfg.dtype]
    param_dtype = _DTYPES[cfg.param_dtype]
    if cfg.teacher == "builtin":
        return load_builtin_teacher(dtype=dtype, param_dtype=param_dtype)
    if cfg.teacher.startswith("preset:"):
        try:
            overrides = json.loads(cfg.teacher_config) if cfg.teacher_config else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher_config={cfg.teacher_config!r} is not a JSON object: {e}") from None
        return init_preset(cfg.teacher[len("preset:"):], overrides, seed=cfg.seed, dtype=dtype,
                           param_dtype=param_dtype, remat=cfg.remat)
    from fraqat_jax.models import from_diffusers

    return from_diffusers(cfg.teacher, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat)


def make_student(teacher, cfg):
    """A quantized copy of ``teacher`` (weights ``target_bits``..., activations ``act_bits``)."""
    student = nnx.clone(teacher)
    if cfg.quant_rules == "none":
        return student
    from fraqat_jax import nn as fq_nn

    # The paper's rules: every linear layer, weights start at 8 bits (the schedule sets them each
    # step), activations at act_bits (8: A8).
    rule = fq_nn.Rule(r".*", weight_bits=8.0, act_bits=float(cfg.act_bits), layer_types=("Linear",))
    return fq_nn.quantize_model(student, [rule])


def set_student_bits(student, bits) -> None:
    """Sets every quantized layer's weight bit-width (``bits`` may be traced)."""
    from fraqat_jax import nn as fq_nn

    fq_nn.set_bits(student, bits)


# ----------------------------------------------------------------------------- calling a family


def pack_2x2(x):
    """Flux packing: [B, C, H, W] -> [B, (H/2)(W/2), 4C] (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(x, shape):
    b, c, h, w = shape
    x = x.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def _flux_ids(h: int, w: int, text_len: int):
    img = np.zeros((h // 2, w // 2, 3), np.float32)
    img[..., 1] = np.arange(h // 2)[:, None]
    img[..., 2] = np.arange(w // 2)[None, :]
    return jnp.asarray(img.reshape(-1, 3)), jnp.zeros((text_len, 3), jnp.float32)


def model_kwargs(family: str, x, timestep, cond: Mapping[str, Any]) -> dict:
    """Keyword arguments of the diffusers-style ``__call__`` for noisy ``x`` [B, C, H, W].

    ``timestep`` is in the family's convention (see the module docstring); ``cond`` holds the
    batch's conditioning fields, passed through by name.
    """
    kw = dict(cond)
    if family == "flux":
        _, _, h, w = x.shape
        text_len = cond["encoder_hidden_states"].shape[1]
        img_ids, txt_ids = _flux_ids(h, w, text_len)
        kw.update(hidden_states=pack_2x2(x), timestep=timestep, img_ids=img_ids, txt_ids=txt_ids)
        return kw
    kw.update(hidden_states=x, timestep=timestep)
    return kw


def apply_model(model, family: str, x, t_model, cond):
    """Runs ``model`` on noisy ``x`` [B, C, H, W]; returns [B, C_out, H, W] (Flux unpacked)."""
    out = model(**model_kwargs(family, x, t_model, cond))
    if family == "flux":
        out = unpack_2x2(out, x.shape)
    return out
