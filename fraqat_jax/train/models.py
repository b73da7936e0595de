"""The run's models: the teacher named by the config (built-in, preset or a diffusers folder) and
its quantized student copy. How each family is called lives in ``fraqat_jax.diffusion.families``."""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import save_file

from fraqat_jax import models, schedules
from fraqat_jax import nn as fq_nn
from fraqat_jax.models.convert import read_config, resolve_model_dir
from fraqat_jax.models.registry import port_class
from fraqat_jax.diffusion import FAMILIES
from fraqat_jax.train.config import ConfigError, parse_keep, parse_weight_granularity

__all__ = ["BUILTIN_TEACHERS", "abstract_models", "init_preset", "load_builtin_teacher", "load_teacher",
           "make_student", "save_builtin_teacher", "student_rules", "teacher_spec"]

#: ``teacher=`` value -> folder under ``fraqat_jax/assets`` (diffusers layout).
BUILTIN_TEACHERS = {"builtin": "digits_dit", "builtin:m": "digits_dit_m"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    """A shipped class-conditional DiT trained on the digits (``python -m fraqat_jax.pretrain``):
    ``builtin`` (tiny) or ``builtin:m`` (about 10x larger)."""
    directory = _asset_dir(name)
    if not os.path.isfile(os.path.join(directory, "config.json")):
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


def load_teacher(cfg) -> nnx.Module:
    """The teacher named by ``cfg.teacher`` (see the config help); ``ConfigError`` if its class is not a
    diffusion transformer the trainer knows (checked before any weight is read)."""
    cls, _ = teacher_spec(cfg)
    if cls.__name__ not in FAMILIES:
        raise ConfigError(f"teacher={cfg.teacher!r} is a {cls.__name__}, which is not supported as a teacher; "
                          f"supported: {', '.join(FAMILIES)}")
    dtype = _DTYPES[cfg.dtype]
    param_dtype = _DTYPES[cfg.param_dtype]
    if cfg.teacher in BUILTIN_TEACHERS:
        return load_builtin_teacher(cfg.teacher, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat,
                                    **port_options(cfg))
    if cfg.teacher.startswith("preset:"):
        return init_preset(cfg.teacher[len("preset:"):], _overrides(cfg), seed=cfg.seed, dtype=dtype,
                           param_dtype=param_dtype, remat=cfg.remat, **port_options(cfg))
    return models.from_diffusers(cfg.teacher, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat,
                                 **port_options(cfg))


def make_student(teacher, cfg):
    """A quantized copy of ``teacher`` (weights ``target_bits``..., activations ``act_bits``)."""
    student = nnx.clone(teacher)
    if cfg.quant_rules == "none":
        return student
    return fq_nn.quantize_model(student, student_rules(cfg))


def student_rules(cfg) -> list:
    """The run's quantization rules, first match wins: each ``keep`` entry (input unquantized, weights
    following the schedule or pinned at its bits), then the paper's rule: every linear layer, weights
    from 8 bits down (the schedule sets them each step), activations at ``act_bits`` (8: A8),
    dynamic per token or static (``act_quant``), weight scales per ``weight_granularity``."""
    channel_axis, group_size = parse_weight_granularity(cfg.weight_granularity)
    weights = dict(channel_axis=channel_axis, group_size=group_size, layer_types=("Linear",))
    rules = [fq_nn.Rule(pattern, weight_bits=8.0 if bits is None else schedules.constant(bits),
                        act_bits=None, **weights) for pattern, bits in parse_keep(cfg.keep)]
    act = "static" if cfg.act_quant == "static" else None
    rules.append(fq_nn.Rule(r".*", weight_bits=8.0, act_bits=float(cfg.act_bits), act_granularity=act, **weights))
    return rules


def teacher_spec(cfg) -> tuple[type, dict]:
    """``(port class, diffusers config)`` of the config's teacher, read without loading weights."""
    if cfg.teacher.startswith("preset:"):
        name = cfg.teacher[len("preset:"):]
        if name not in models.PRESETS:
            raise ConfigError(f"teacher preset {name!r} is unknown; allowed: {', '.join(models.PRESETS)}")
        cls_name, config = models.PRESETS[name]
        return models.MODEL_CLASSES[cls_name], {**config, **_overrides(cfg)}
    directory = _asset_dir(cfg.teacher) if cfg.teacher in BUILTIN_TEACHERS else resolve_model_dir(cfg.teacher)
    config = read_config(directory)
    return port_class(config.get("_class_name")), config


def abstract_models(cfg):
    """``(teacher, student)`` as the run builds them, with ``jax.ShapeDtypeStruct`` leaves: shapes,
    dtypes and sharding names only, no memory and no weights read (for ahead-of-time planning)."""
    cls, config = teacher_spec(cfg)

    def build():
        return cls(config, rngs=nnx.Rngs(cfg.seed), dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype],
                   remat=cfg.remat, **port_options(cfg))

    return nnx.eval_shape(build), nnx.eval_shape(lambda: make_student(build(), cfg))


def port_options(cfg) -> dict:
    """The transformer ports' build options from the config: ``scan_layers`` and ``attention``."""
    return {"scan_layers": bool(cfg.scan_layers), "attention": cfg.attention}


def _overrides(cfg) -> dict:
    try:
        return json.loads(cfg.teacher_config) if cfg.teacher_config else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"teacher_config={cfg.teacher_config!r} is not a JSON object: {e}") from None
