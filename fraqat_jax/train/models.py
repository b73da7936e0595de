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

__all__ = ["BUILTIN_TEACHER", "FAMILIES", "family_of", "load_builtin_teacher", "load_teacher",
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
    return str(importlib.resources.files("fraqat_jax.assets").joinpath(BUILTIN_TEACHER))


def save_builtin_teacher(model, directory: str | None = None) -> str:
    """Writes a DiT as ``config.json`` + ``model.safetensors`` (NNX paths joined by '.')."""
    from safetensors.numpy import save_file

    directory = directory or _asset_dir()
    os.makedirs(directory, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(str(p) for p in path): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
               for path, v in flat}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": type(model).__name__, **dict(model.config)}, f, indent=1, sort_keys=True)
    return directory


def _load_flat(model, path: str):
    from safetensors.numpy import load_file

    tensors = load_file(path)
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    keys = {".".join(str(p) for p in k): k for k in flat}
    missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{path}: missing parameters {missing[:5]}, unexpected {unexpected[:5]}")
    for name, k in keys.items():
        v = flat[k]
        old = v.get_value() if hasattr(v, "get_value") else v.value
        if tuple(old.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{path}: parameter {name} has shape {tensors[name].shape}, model wants {old.shape}")
        v.set_value(jnp.asarray(tensors[name], old.dtype)) if hasattr(v, "set_value") else setattr(v, "value", jnp.asarray(tensors[name], old.dtype))
    return model


def load_builtin_teacher(*, dtype=None, param_dtype=jnp.float32, directory: str | None = None):
    """The shipped tiny class-conditional DiT trained on the digits (``python -m fraqat_jax.pretrain``)."""
    from fraqat_jax.models import MODEL_CLASSES

    directory = directory or _asset_dir()
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"the built-in teacher is missing ({cfg_path}); run python -m fraqat_jax.pretrain")
    with open(cfg_path) as f:
        config = json.load(f)
    cls = MODEL_CLASSES[config.pop("_class_name")]
    model = cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    return _load_flat(model, os.path.join(directory, "model.safetensors"))


def load_teacher(cfg) -> nnx.Module:
    """The teacher named by ``cfg.teacher`` (see the config help)."""
    dtype = _DTYPES[cfg.dtype]
    param_dtype = _DTYPES[cfg.param_dtype]
    overrides = json.loads(cfg.teacher_config) if cfg.teacher_config else {}
    if cfg.teacher == "builtin":
        return load_builtin_teacher(dtype=dtype, param_dtype=param_dtype)
    from fraqat_jax import models

    if cfg.teacher.startswith("preset:"):
        name = cfg.teacher[len("preset:"):]
        if name not in models.PRESETS:
            raise ValueError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
        cls_name, config = models.PRESETS[name]
        cls = models.MODEL_CLASSES[cls_name]
        return cls({**config, **overrides}, rngs=nnx.Rngs(cfg.seed), dtype=dtype, param_dtype=param_dtype,
                   remat=cfg.remat)
    if os.path.isfile(os.path.join(cfg.teacher, "model.safetensors")):  # save_builtin_teacher's format
        return load_builtin_teacher(dtype=dtype, param_dtype=param_dtype, directory=cfg.teacher)
    return models.from_diffusers(cfg.teacher, dtype=dtype)


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
