"""Diffusion teachers: the shipped digits DiTs, presets with random weights, diffusers folders.

``teacher=`` takes ``builtin`` / ``builtin:m`` / ``builtin:sana`` (:data:`BUILTIN_TEACHERS`, ``python -m
fraqat_jax.pretrain`` builds them; ``builtin:sana`` is a whole ``SanaPipeline`` folder whose
transformer is the teacher), ``preset:NAME`` (``fraqat_jax.models.PRESETS``, random weights,
``teacher_config`` overriding keys of the preset's config) or a diffusers model folder / file.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import save_file

from fraqat_jax import models
from fraqat_jax.family import ConfigError
from fraqat_jax.models.convert import read_config, resolve_model_dir
from fraqat_jax.models.registry import port_class

__all__ = ["BUILTIN_TEACHERS", "DTYPES", "teacher_pipeline", "build_options", "init_preset", "load_builtin_teacher", "load_teacher",
           "save_builtin_teacher", "teacher_class", "teacher_spec"]

#: ``teacher=`` value -> folder under ``fraqat_jax/assets`` (diffusers layout).
BUILTIN_TEACHERS = {"builtin": "digits_dit", "builtin:m": "digits_dit_m", "builtin:sana": "tiny_sana"}
# -- text-to-image pipeline teachers (builtin:sana) ----------------------------------------------
_BUILTIN_CLASSES = {"builtin:sana": "SanaTransformer2DModel"}  # the rest are digits DiTs
_PIPELINE_EXTRAS = "fraqat.json"


def teacher_pipeline(teacher: str) -> str | None:
    """The pipeline folder (``model_index.json`` + ``fraqat.json``: text encoder, tokenizer,
    autoencoder and captions beside the transformer) a teacher comes from, or None: the folder
    itself or, for its ``transformer/`` subfolder, the folder above."""
    if teacher.startswith("preset:"):
        return None
    directory = _asset_dir(teacher) if teacher in BUILTIN_TEACHERS else teacher
    for candidate in (directory, os.path.dirname(os.path.normpath(directory))):
        if os.path.isfile(os.path.join(candidate, _PIPELINE_EXTRAS)) and os.path.isdir(os.path.join(candidate, "vae")):
            return candidate
    return None
# ------------------------------------------------------------------------------------------------
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _asset_dir(name: str = "builtin") -> str:
    return str(importlib.resources.files("fraqat_jax").joinpath("assets", BUILTIN_TEACHERS[name]))


def save_builtin_teacher(model, directory: str | None = None) -> str:
    """Writes a model as a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
    loadable by ``fraqat_jax.models.from_diffusers`` and by diffusers itself."""
    directory = directory or _asset_dir()
    os.makedirs(directory, exist_ok=True)
    save_file(models.to_diffusers_state_dict(model), os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": type(model).__name__, **dict(model.config)}, f, indent=1, sort_keys=True)
    return directory


def load_builtin_teacher(name: str = "builtin", *, dtype=None, param_dtype=jnp.float32, **options):
    """A shipped teacher trained on the digits (``python -m fraqat_jax.pretrain``): the class-conditional
    DiTs ``builtin`` (tiny) or ``builtin:m`` (about 10x larger), or the transformer of the text-to-image
    pipeline ``builtin:sana``."""
    directory = _asset_dir(name)
    if not os.path.isfile(os.path.join(directory, "config.json")) and not os.path.isfile(
            os.path.join(directory, "transformer", "config.json")):
        size = "" if name == "builtin" else f" --size {name.split(':')[1]}"
        raise ValueError(f"the built-in teacher {name!r} is missing ({directory}); run python -m fraqat_jax.pretrain{size}")
    return models.from_diffusers(directory, dtype=dtype, param_dtype=param_dtype, **options)


def init_preset(name: str, overrides: Mapping[str, Any] | None = None, *, seed: int = 0, dtype=None,
                param_dtype=jnp.float32, remat: bool = False, **options):
    """A preset model with random weights, initialised in one jitted call (not op by op)."""
    if name not in models.PRESETS:
        raise ValueError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
    cls_name, config = models.PRESETS[name]
    cls = models.MODEL_CLASSES[cls_name]
    config = {**config, **dict(overrides or {})}

    def build():
        return cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, remat=remat, **options)

    graph = nnx.graphdef(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()))()
    return nnx.merge(graph, state)


def build_options(cfg) -> dict:
    """The ports' build options from the config: dtypes, ``remat``, ``scan_layers``, ``attention``."""
    return {"dtype": DTYPES[cfg.dtype], "param_dtype": DTYPES[cfg.param_dtype], "remat": cfg.remat,
            "scan_layers": bool(cfg.scan_layers), "attention": cfg.attention}


def teacher_class(teacher: str) -> str | None:
    """The class name ``teacher`` names (a built-in name, a preset, or a diffusers folder / file with a
    ``_class_name``), or None when it is none of these."""
    if teacher in BUILTIN_TEACHERS:
        return _BUILTIN_CLASSES.get(teacher, "DiTTransformer2DModel")
    if teacher.startswith("preset:"):
        name = teacher[len("preset:"):]
        if name not in models.PRESETS:
            raise ConfigError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
        return models.PRESETS[name][0]
    try:
        directory = resolve_model_dir(teacher)
    except OSError:  # not a folder: not a diffusers model
        return None
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    return read_config(directory).get("_class_name")  # a broken config.json: one line naming it


def teacher_spec(cfg) -> tuple[type, dict]:
    """``(port class, diffusers config)`` of the config's teacher, read without loading weights."""
    if cfg.teacher.startswith("preset:"):
        name = cfg.teacher[len("preset:"):]
        if name not in models.PRESETS:
            raise ConfigError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
        cls_name, config = models.PRESETS[name]
        return models.MODEL_CLASSES[cls_name], {**config, **_overrides(cfg)}
    directory = resolve_model_dir(_asset_dir(cfg.teacher) if cfg.teacher in BUILTIN_TEACHERS else cfg.teacher)
    config = read_config(directory)
    return port_class(config.get("_class_name")), config


def load_teacher(cfg) -> nnx.Module:
    """The teacher named by ``cfg.teacher`` with its weights (random for a preset)."""
    options = build_options(cfg)
    if cfg.teacher in BUILTIN_TEACHERS:
        return load_builtin_teacher(cfg.teacher, **options)
    if cfg.teacher.startswith("preset:"):
        return init_preset(cfg.teacher[len("preset:"):], _overrides(cfg), seed=cfg.seed, **options)
    return models.from_diffusers(cfg.teacher, **options)


def _overrides(cfg) -> dict:
    try:
        return json.loads(cfg.teacher_config) if cfg.teacher_config else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher_config={cfg.teacher_config!r} is not a JSON object: {e}") from None
