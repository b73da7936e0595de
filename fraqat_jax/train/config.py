"""Run configuration: the built-in default, config files, ``KEY=VALUE`` overrides, validation.

The trainer's keys are listed here; each model family adds its own (``Family.config_keys``: image
size and timesteps for diffusion, sequence length and loss for text), and the family of the
run's teacher validates them and the ``data`` forms it reads.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

import ml_collections

from fraqat_jax import schedules
from fraqat_jax.quant import MAX_ACT_BITS, MAX_BITS, MIN_BITS
from fraqat_jax.family import ConfigError, FamilyError, all_config_keys, family_for_teacher
from fraqat_jax.nn.rules import parse_keep
from fraqat_jax.nn.rules import parse_layer_schedules as _parse_layer_schedules
from fraqat_jax.nn.rules import parse_weight_granularity as _parse_weight_granularity

__all__ = ["ConfigError", "HELP", "RENAMED", "get_config", "load_config", "parse_keep", "parse_weight_granularity",
           "upgrade_saved", "validate"]


# key: (default, help). The default run: the shipped digits DiT distilled on the shipped digits.
_DEFAULTS: dict[str, tuple[Any, str]] = {
    "teacher": ("builtin", "teacher: 'builtin' (tiny digits DiT), 'builtin:m' (~10x larger digits DiT), a "
                "diffusers model dir / safetensors file, or 'preset:NAME' (random weights, fraqat_jax.models.PRESETS)"),
    "teacher_config": ("", "JSON object overriding keys of the teacher's diffusers config (preset teachers)"),
    "data": ("digits", "data source: digits | tfds:NAME[:SPLIT] | latents:DIR | datafree"),
    "data_dir": ("", "TFDS data_dir (empty: TFDS default)"),
    "steps": (225, "total optimizer updates; the bit schedule is scaled to them"),
    "schedule": ("fraqat", "bit-width schedule: " + " | ".join(schedules.NAMES) + " (fraqat_jax.schedules); "
                 "linear:F / cosine:F descend over the first fraction F of the steps, then hold target_bits "
                 "(linear:0.44 spans the staircase's 11 of 25 epochs)"),
    "target_bits": (4.0, "final weight bit-width of the schedule"),
    "start_bits": (8.0, "first bit-width of the linear / cosine schedules"),
    "act_bits": (8.0, "activation bit-width"),
    "quant_rules": ("paper", "which layers to quantize: 'paper' (every linear layer) or 'none' (FP student)"),
    "act_ranges": ("dynamic", "how activation ranges are found: dynamic (min/max at run time, per act_granularity: "
                   "GPU/TPU) | static (each layer's input range calibrated once before the first step on 100 samples "
                   "of the run's data at mean +/- 3 std with an integer zero point, then fixed through training and "
                   "export: phones)"),
    "act_granularity": ("token", "granularity of dynamic activation ranges: token (one range per token) | tensor "
                        "(one per input tensor)"),
    "weight_granularity": ("tensor", "weight scales: tensor (one per layer, the paper's) | channel (one per output "
                           "channel) | group:N (one per output channel and group of N input rows)"),
    "keep": ("", "layers kept at higher precision, by module path: REGEX[:BITS] entries separated by ';'. A "
             "matching layer's input stays unquantized (A16; e.g. 'proj_out' gives the paper's W4A16 last layer on "
             "the phone); with :BITS its weights also stay at BITS bits instead of following the schedule"),
    "layer_schedules": ("", "layers with their own bit-width schedule, by module path: REGEX=SCHEDULE entries "
                        "separated by ';' (SCHEDULE as for schedule=, scaled to the run's steps and target_bits), "
                        "e.g. 'proj_out=constant' or 'transformer_blocks\\.0\\..*=integer'; the rest follow schedule"),
    "batch_size": (64, "global batch size (examples per optimizer update)"),
    "grad_accum": (1, "micro-batches per update (the global batch is split into this many)"),
    "lr": (3e-4, "peak learning rate (paper: SD3.5-M 1e-6, Sana 1e-7, PixArt-Sigma 1e-6)"),
    "lr_schedule": ("cosine", "learning-rate schedule: cosine (linear warmup, cosine decay) | constant (warmup, then "
                    "flat) | restart (warmup, then a cosine decay that restarts at the peak at each change of bits)"),
    "warmup_steps": (10, "learning-rate warmup updates"),
    "end_lr_fraction": (0.1, "cosine decay ends at lr * this"),
    "b1": (0.9, "AdamW beta1"),
    "b2": (0.999, "AdamW beta2"),
    "eps": (1e-8, "AdamW epsilon"),
    "weight_decay": (0.0, "AdamW weight decay (the paper states none)"),
    "clip_norm": (1.0, "global gradient-norm clip (0: off)"),
    "ema_decay": (0.0, "EMA of the student's weights (0: off, e.g. 0.999)"),
    "seed": (1234, "random seed (the paper's)"),
    "mesh": ("", "device mesh, e.g. data=4,fsdp=2,tensor=1 (empty: data over every device)"),
    "log_every": (10, "write a metrics row every K updates"),
    "checkpoint_every": (100, "save a checkpoint every N updates (and at the end)"),
    "keep_checkpoints": (2, "how many recent checkpoints to keep"),
    "sample_grids": (True, "write teacher/student samples at each change of bit-width (images: a PNG grid; text: a .txt of "
                     "greedy continuations)"),
    "num_samples": (10, "samples per grid row (text: prompts continued)"),
    "dtype": ("float32", "compute dtype: float32 | bfloat16"),
    "param_dtype": ("float32", "parameter dtype: float32 | bfloat16"),
    "remat": (False, "rematerialize transformer blocks (saves memory)"),
    "scan_layers": (False, "run each port's repeated blocks under lax.scan over stacked parameters, so compile time "
                    "and host memory do not grow with depth (checkpoints keep diffusers' per-block names)"),
    "attention": ("xla", "attention kernel: xla (plain, materialises the scores) | auto (cuDNN on GPU, Pallas flash "
                  "on TPU, XLA on CPU; the paper presets' setting) | flash (never materialises the score matrix)"),
    "progress": ("auto", "progress display: auto (bar on a terminal) | bar | log | none"),
}

_DEFAULTS.update({k: v for k, v in all_config_keys().items() if k not in _DEFAULTS})
HELP = {k: h for k, (_, h) in _DEFAULTS.items()}

#: Config keys that were renamed: old name -> new name. Given by a user they exit 2 naming the new
#: key; in a saved config (a checkpoint's, a run's config.json) they are read as the new key.
RENAMED = {"act_quant": "act_ranges"}


def upgrade_saved(config: Mapping[str, Any]) -> dict:
    """A config saved by an earlier version in today's keys (see :data:`RENAMED`)."""
    out = dict(config)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _renamed(key: str, where: str) -> ConfigError:
    return ConfigError(f"config key {key!r} in {where} was renamed: use {RENAMED[key]}= "
                       f"({' | '.join(_CHOICES.get(RENAMED[key], ()))})")

_CHOICES = {
    "lr_schedule": ("cosine", "constant", "restart"),
    "quant_rules": ("paper", "none"),
    "act_ranges": ("dynamic", "static"),
    "act_granularity": ("token", "tensor"),
    "attention": ("auto", "xla", "flash"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "progress": ("auto", "bar", "log", "none"),
}


def get_config() -> ml_collections.ConfigDict:
    """The built-in default run (a fresh, unlocked-values but key-locked ConfigDict)."""
    cfg = ml_collections.ConfigDict({k: v for k, (v, _) in _DEFAULTS.items()})
    cfg.lock()
    return cfg


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not allowed: use true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not allowed: use an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not allowed: use a number") from None
    return text


def parse_weight_granularity(text: str) -> tuple[int | None, int | None]:
    """``weight_granularity`` -> ``(channel_axis, group_size)`` (``fraqat_jax.nn.rules``), ``ConfigError`` if bad."""
    try:
        return _parse_weight_granularity(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every key and value; raises ConfigError naming the first bad one."""
    unknown = sorted(set(cfg.keys()) - set(_DEFAULTS))
    if unknown and unknown[0] in RENAMED:
        raise _renamed(unknown[0], "the config")
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(_DEFAULTS)}")
    if cfg.act_granularity == "static":
        raise ConfigError("act_granularity='static' is not allowed: static ranges are act_ranges=static "
                          "(act_granularity is token or tensor)")
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not allowed: choose one of {', '.join(allowed)}")
    try:
        schedules.parse_name(cfg.schedule)
    except ValueError as e:
        raise ConfigError(f"schedule={cfg.schedule!r} is not allowed: {e}") from None
    positive = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                "num_samples")
    for key in positive:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} is not allowed: use a positive integer")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}")
    for key in ("target_bits", "start_bits"):
        if not MIN_BITS <= float(cfg[key]) <= MAX_BITS:
            raise ConfigError(f"{key}={cfg[key]!r} is not allowed: use a bit-width in [{MIN_BITS:g}, {MAX_BITS:g}]")
    if not MIN_BITS <= float(cfg.act_bits) <= MAX_ACT_BITS:
        raise ConfigError(f"act_bits={cfg.act_bits!r} is not allowed: use a bit-width in [{MIN_BITS:g}, {MAX_ACT_BITS:g}]")
    parse_weight_granularity(cfg.weight_granularity)
    try:
        parse_keep(cfg.keep)
        _parse_layer_schedules(cfg.layer_schedules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.lr > 0:
        raise ConfigError(f"lr={cfg.lr!r} is not allowed: use a positive number")
    if cfg.lr_schedule == "restart" and schedules.is_smooth(cfg.schedule):
        raise ConfigError(f"lr_schedule='restart' restarts at each change of bits, which needs a staircase: "
                          f"schedule={cfg.schedule!r} is not allowed with it; use one of "
                          f"{', '.join(n for n in schedules.NAMES if n not in schedules.SMOOTH)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={cfg.ema_decay!r} is not allowed: use a number in [0, 1)")
    if cfg.warmup_steps < 0 or cfg.clip_norm < 0 or cfg.weight_decay < 0:
        raise ConfigError("warmup_steps, clip_norm and weight_decay must be >= 0, got "
                          f"{cfg.warmup_steps}, {cfg.clip_norm}, {cfg.weight_decay}")
    t = cfg.teacher
    try:
        family = family_for_teacher(t)
    except FamilyError:
        if not os.path.exists(t):
            raise ConfigError(f"teacher={t!r} does not exist: use 'builtin', 'builtin:m', 'preset:NAME' or a "
                              "diffusers model directory / safetensors file") from None
        raise
    family.validate_config(cfg)
    return cfg


def _load_file(path: str) -> ml_collections.ConfigDict | Mapping:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_fraqat_user_config", path)
    module = importlib.util.module_from_spec(spec)
    # The file's folder is importable while it runs, so a preset imports its shared part
    # (``from _paper import paper_config``); modules imported from there are forgotten afterwards.
    folder = os.path.dirname(os.path.abspath(path))
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path!r} defines no get_config()")
        return module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # any error inside the user's file
        raise ConfigError(f"config file {path!r} has an error: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - before:
            if os.path.dirname(os.path.abspath(getattr(sys.modules[name], "__file__", None) or "")) == folder:
                del sys.modules[name]


def load_config(path: str | None = None, overrides: Iterable[str] = (), *,
                base: Mapping | None = None) -> ml_collections.ConfigDict:
    """Default config, updated by ``base`` (a mapping), a config file, then ``KEY=VALUE`` overrides."""
    cfg = get_config()

    def update(values: Mapping, where: str):
        for k, v in dict(values).items():
            if k in RENAMED:
                raise _renamed(k, where)
            if k not in _DEFAULTS:
                raise ConfigError(f"unknown config key {k!r} in {where}; allowed keys: {', '.join(_DEFAULTS)}")
            default = _DEFAULTS[k][0]
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(v) is not type(default):
                raise ConfigError(f"{k}={v!r} in {where} has type {type(v).__name__}; expected "
                                  f"{type(default).__name__}")
            cfg[k] = v

    if base is not None:
        update(base, "the given config")
    if path:
        update(_load_file(path), f"config file {path!r}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        k, text = item.split("=", 1)
        k = k.strip()
        if k in RENAMED:
            raise _renamed(k, "--set")
        if k not in _DEFAULTS:
            raise ConfigError(f"unknown config key {k!r} in --set; allowed keys: {', '.join(_DEFAULTS)}")
        cfg[k] = _parse_value(k, text, _DEFAULTS[k][0])
    return validate(cfg)
