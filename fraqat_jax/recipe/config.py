"""The run's config: typed keys (frozen dataclasses), their checks, and how a config is read.

A run's keys are the trainer's own (:class:`TrainConfig`, one field per key with its default, help
and check) and those of its family (the family's ``Config``: image size and timesteps for diffusion,
sequence length and loss for text). The family is the one whose models ``teacher`` names, chosen
after the config file and every ``KEY=VALUE`` override are read, so a key of another family is
refused naming the family it belongs to, and a run's ``config.json`` holds its family's keys only.

The config itself is a key-locked ``ml_collections.ConfigDict`` of those keys (attribute access,
``to_dict``), checked by :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

import ml_collections

from fraqat_jax import schedules
from fraqat_jax.family import ConfigError, Family, FamilyError, families, family_for_teacher
from fraqat_jax.family.settings import (Key, coerce, int_at_least, keys_of, merged, number_in, one_of, parse_text,
                                        run_checks, setting)
from fraqat_jax.nn.rules import parse_keep, parse_layer_schedules, parse_weight_granularity
from fraqat_jax.quant import MAX_ACT_BITS, MAX_BITS, MIN_BITS

__all__ = ["ConfigError", "HELP", "RENAMED", "TrainConfig", "family_keys", "get_config", "help_for", "keys_for",
           "load_config", "upgrade_saved", "validate"]


def _wrapped(parse):
    """A check from a parser that raises ValueError (re-raised as ConfigError)."""
    def check(value, key: str = "value"):
        try:
            parse(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return check


def _schedule(value, key: str = "schedule"):
    try:
        schedules.parse_name(value)
    except ValueError as e:
        raise ConfigError(f"{key}={value!r} is not allowed: {e}") from None


def _act_granularity(value, key: str = "act_granularity"):
    if value == "static":
        raise ConfigError("act_granularity='static' is not allowed: static ranges are act_ranges=static "
                          "(act_granularity is token or tensor)")
    one_of("token", "tensor")(value, key)


def _positive(value, key: str = "value"):
    if not value > 0:
        raise ConfigError(f"{key}={value!r} is not allowed: use a positive number")


_BITS = number_in(MIN_BITS, MAX_BITS, what="a bit-width")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The trainer's own keys (every run has them). The default run: the shipped digits DiT
    distilled on the shipped digits."""

    #: the model distilled
    teacher: str = setting("builtin", "teacher: 'builtin' (tiny digits DiT), 'builtin:m' (~10x larger digits DiT), "
                           "'builtin:lm' (tiny Gemma-2), a diffusers or transformers model dir / safetensors file, or "
                           "'preset:NAME' (random weights, fraqat_jax.models.PRESETS)")
    #: JSON overrides of the teacher's model config
    teacher_config: str = setting("", "JSON object overriding keys of the teacher's model config (preset teachers)")
    #: where the training examples come from (the family says which forms it reads)
    data: str = setting("digits", "data source: digits | tfds:NAME[:SPLIT] | latents:DIR | text:PATH | datafree "
                        "(the teacher's family says which it reads)")
    #: TFDS data_dir
    data_dir: str = setting("", "TFDS data_dir (empty: TFDS default)")
    #: optimizer updates
    steps: int = setting(225, "total optimizer updates; the bit schedule is scaled to them", int_at_least(1))
    #: the bit-width schedule
    schedule: str = setting("fraqat", "bit-width schedule: " + " | ".join(schedules.NAMES) + " (fraqat_jax.schedules); "
                            "linear:F / cosine:F descend over the first fraction F of the steps, then hold target_bits "
                            "(linear:0.44 spans the staircase's 11 of 25 epochs)", _schedule)
    #: final weight bit-width
    target_bits: float = setting(4.0, "final weight bit-width of the schedule", _BITS)
    #: first bit-width of the smooth schedules
    start_bits: float = setting(8.0, "first bit-width of the linear / cosine schedules", _BITS)
    #: activation bit-width
    act_bits: float = setting(8.0, "activation bit-width", number_in(MIN_BITS, MAX_ACT_BITS, what="a bit-width"))
    #: which layers are quantized
    quant_rules: str = setting("paper", "which layers to quantize: 'paper' (every linear layer) or 'none' (FP student)",
                               one_of("paper", "none"))
    #: how activation ranges are found
    act_ranges: str = setting("dynamic", "how activation ranges are found: dynamic (min/max at run time, per "
                              "act_granularity: GPU/TPU) | static (each layer's input range calibrated once before the "
                              "first step on 100 samples of the run's data at mean +/- 3 std with an integer zero point, "
                              "then fixed through training and export: phones)", one_of("dynamic", "static"))
    #: granularity of dynamic activation ranges
    act_granularity: str = setting("token", "granularity of dynamic activation ranges: token (one range per token) | "
                                   "tensor (one per input tensor)", _act_granularity)
    #: granularity of weight scales
    weight_granularity: str = setting("tensor", "weight scales: tensor (one per layer, the paper's) | channel (one per "
                                      "output channel) | group:N (one per output channel and group of N input rows)",
                                      _wrapped(parse_weight_granularity))
    #: layers kept at higher precision
    keep: str = setting("", "layers kept at higher precision, by module path: REGEX[:BITS] entries separated by ';'. A "
                        "matching layer's input stays unquantized (A16; e.g. 'proj_out' gives the paper's W4A16 last "
                        "layer on the phone); with :BITS its weights also stay at BITS bits instead of following the "
                        "schedule", _wrapped(parse_keep))
    #: layers with their own bit-width schedule
    layer_schedules: str = setting("", "layers with their own bit-width schedule, by module path: REGEX=SCHEDULE "
                                   "entries separated by ';' (SCHEDULE as for schedule=, scaled to the run's steps and "
                                   "target_bits), e.g. 'proj_out=constant' or 'transformer_blocks\\.0\\..*=integer'; "
                                   "the rest follow schedule", _wrapped(parse_layer_schedules))
    #: examples per optimizer update
    batch_size: int = setting(64, "global batch size (examples per optimizer update)", int_at_least(1))
    #: micro-batches per update
    grad_accum: int = setting(1, "micro-batches per update (the global batch is split into this many)", int_at_least(1))
    #: peak learning rate
    lr: float = setting(3e-4, "peak learning rate (paper: SD3.5-M 1e-6, Sana 1e-7, PixArt-Sigma 1e-6)", _positive)
    #: learning-rate schedule
    lr_schedule: str = setting("cosine", "learning-rate schedule: cosine (linear warmup, cosine decay) | constant "
                               "(warmup, then flat) | restart (warmup, then a cosine decay that restarts at the peak at "
                               "each change of bits)", one_of("cosine", "constant", "restart"))
    #: learning-rate warmup updates
    warmup_steps: int = setting(10, "learning-rate warmup updates")
    #: where the cosine decay ends, as a fraction of lr
    end_lr_fraction: float = setting(0.1, "cosine decay ends at lr * this")
    #: AdamW beta1
    b1: float = setting(0.9, "AdamW beta1")
    #: AdamW beta2
    b2: float = setting(0.999, "AdamW beta2")
    #: AdamW epsilon
    eps: float = setting(1e-8, "AdamW epsilon")
    #: AdamW weight decay
    weight_decay: float = setting(0.0, "AdamW weight decay (the paper states none)")
    #: global gradient-norm clip
    clip_norm: float = setting(1.0, "global gradient-norm clip (0: off)")
    #: EMA of the student's weights
    ema_decay: float = setting(0.0, "EMA of the student's weights (0: off, e.g. 0.999)",
                               number_in(0.0, 1.0, high_open=True))
    #: random seed
    seed: int = setting(1234, "random seed (the paper's)")
    #: device mesh
    mesh: str = setting("", "device mesh, e.g. data=4,fsdp=2,tensor=1 (empty: data over every device)")
    #: metrics row every K updates
    log_every: int = setting(10, "write a metrics row every K updates", int_at_least(1))
    #: checkpoint every N updates
    checkpoint_every: int = setting(100, "save a checkpoint every N updates (and at the end)", int_at_least(1))
    #: recent checkpoints kept
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", int_at_least(1))
    #: write samples at each change of bit-width
    sample_grids: bool = setting(True, "write teacher/student samples at each change of bit-width (images: a PNG grid; "
                                 "text: a .txt of greedy continuations)")
    #: samples per grid row
    num_samples: int = setting(10, "samples per grid row (text: prompts continued)", int_at_least(1))
    #: compute dtype
    dtype: str = setting("float32", "compute dtype: float32 | bfloat16", one_of("float32", "bfloat16"))
    #: parameter dtype
    param_dtype: str = setting("float32", "parameter dtype: float32 | bfloat16", one_of("float32", "bfloat16"))
    #: rematerialize blocks
    remat: bool = setting(False, "rematerialize transformer blocks (saves memory)")
    #: scan repeated blocks
    scan_layers: bool = setting(False, "run each port's repeated blocks under lax.scan over stacked parameters, so "
                                "compile time and host memory do not grow with depth (checkpoints keep diffusers' "
                                "per-block names)")
    #: attention kernel
    attention: str = setting("xla", "attention kernel: xla (plain, materialises the scores) | auto (cuDNN on GPU, "
                             "Pallas flash on TPU, XLA on CPU; the paper presets' setting) | flash (never materialises "
                             "the score matrix)", one_of("auto", "xla", "flash"))
    #: progress display
    progress: str = setting("auto", "progress display: auto (bar on a terminal) | bar | log | none",
                            one_of("auto", "bar", "log", "none"))


#: The trainer's own keys.
TRAIN_KEYS: dict[str, Key] = keys_of(TrainConfig)

#: Config keys that were renamed: old name -> new name. Given by a user they exit 2 naming the new
#: key; in a saved config (a checkpoint's, a run's config.json) they are read as the new key.
RENAMED = {"act_quant": "act_ranges"}


def keys_for(family: Family) -> dict[str, Key]:
    """Every key of a run of ``family``: the trainer's, then the family's."""
    return merged(TRAIN_KEYS.values(), keys_of(family.Config).values())


def family_keys() -> dict[str, list[str]]:
    """``{key: [family names]}`` for the keys that belong to families (not to the trainer)."""
    out: dict[str, list[str]] = {}
    for family in families().values():
        for name in keys_of(family.Config):
            if name not in TRAIN_KEYS:
                out.setdefault(name, []).append(family.name)
    return out


def _default_family() -> Family:
    return family_for_teacher(TrainConfig.teacher)


def help_for(family: Family | None = None) -> dict[str, str]:
    """``{key: help}`` of a run of ``family`` (default: the default run's)."""
    return {k: key.help for k, key in keys_for(family or _default_family()).items()}


def __getattr__(name):
    if name == "HELP":  # the default run's keys (families are looked up on first use)
        return help_for()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_config(family: Family | None = None) -> ml_collections.ConfigDict:
    """The built-in default run, or the defaults of a run of ``family`` (a key-locked ConfigDict)."""
    cfg = ml_collections.ConfigDict({k: key.default for k, key in keys_for(family or _default_family()).items()})
    cfg.lock()
    return cfg


def _family_of_teacher(teacher: str) -> Family:
    try:
        return family_for_teacher(teacher)
    except FamilyError:
        if not os.path.exists(teacher):
            raise ConfigError(f"teacher={teacher!r} does not exist: use 'builtin', 'builtin:m', 'builtin:lm', "
                              "'preset:NAME' or a diffusers / transformers model directory / safetensors file") from None
        raise


def upgrade_saved(config: Mapping[str, Any]) -> dict:
    """A config saved by an earlier version in today's keys: renamed keys (:data:`RENAMED`) under
    their new name, and the keys of other families (an earlier version saved every family's keys
    in every run) left out."""
    out = dict(config)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    try:
        family = family_for_teacher(str(out.get("teacher", TrainConfig.teacher)))
    except ConfigError:
        return out
    own, others = keys_for(family), family_keys()
    return {k: v for k, v in out.items() if k in own or k not in others}


def _renamed(key: str, where: str) -> ConfigError:
    allowed = getattr(TRAIN_KEYS[RENAMED[key]].check, "allowed", ())
    return ConfigError(f"config key {key!r} in {where} was renamed: use {RENAMED[key]}= ({' | '.join(allowed)})")


def _unknown(key: str, where: str, family: Family, teacher: str, allowed: Iterable[str]) -> ConfigError:
    owners = family_keys().get(key)
    if owners:
        return ConfigError(f"unknown config key {key!r} in {where} for a {family.name} run (teacher={teacher!r}): it "
                           f"belongs to {', '.join(owners)} runs; allowed keys: {', '.join(allowed)}")
    return ConfigError(f"unknown config key {key!r} in {where}; allowed keys: {', '.join(allowed)}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every key and value (each key's own check, then those between keys, then the family's);
    raises ConfigError naming the first bad one."""
    family = _family_of_teacher(cfg.teacher)
    keys = keys_for(family)
    unknown = [k for k in cfg.keys() if k not in keys]
    if unknown and unknown[0] in RENAMED:
        raise _renamed(unknown[0], "the config")
    if unknown:
        raise _unknown(unknown[0], "the config", family, cfg.teacher, keys)
    run_checks(keys, cfg)
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}")
    if cfg.lr_schedule == "restart" and schedules.is_smooth(cfg.schedule):
        raise ConfigError(f"lr_schedule='restart' restarts at each change of bits, which needs a staircase: "
                          f"schedule={cfg.schedule!r} is not allowed with it; use one of "
                          f"{', '.join(n for n in schedules.NAMES if n not in schedules.SMOOTH)}")
    if cfg.warmup_steps < 0 or cfg.clip_norm < 0 or cfg.weight_decay < 0:
        raise ConfigError("warmup_steps, clip_norm and weight_decay must be >= 0, got "
                          f"{cfg.warmup_steps}, {cfg.clip_norm}, {cfg.weight_decay}")
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
    """The default run, updated by ``base`` (a mapping), a config file, then ``KEY=VALUE`` overrides,
    with the keys of the family that the resulting ``teacher`` names (see the module docstring)."""
    items: list[tuple[str, Any, str, bool]] = []  # (key, value, where, value is --set text)

    def collect(values: Mapping, where: str):
        for k, v in dict(values).items():
            if k in RENAMED:
                raise _renamed(k, where)
            items.append((k, v, where, False))

    if base is not None:
        collect(base, "the given config")
    if path:
        collect(_load_file(path), f"config file {path!r}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        k, text = item.split("=", 1)
        k = k.strip()
        if k in RENAMED:
            raise _renamed(k, "--set")
        items.append((k, text, "--set", True))
    known = [*TRAIN_KEYS, *family_keys()]
    for k, _, where, _ in items:  # a key of no run at all: named before the teacher is looked at
        if k not in known:
            raise ConfigError(f"unknown config key {k!r} in {where}; allowed keys: {', '.join(known)}")
    teacher = TrainConfig.teacher
    for k, v, where, is_text in items:
        if k == "teacher":
            teacher = v if is_text else coerce(TRAIN_KEYS["teacher"], v, where)
    family = _family_of_teacher(teacher)
    keys = keys_for(family)
    cfg = get_config(family)
    for k, v, where, is_text in items:
        if k not in keys:
            raise _unknown(k, where, family, teacher, keys)
        cfg[k] = parse_text(keys[k], v) if is_text else coerce(keys[k], v, where)
    return validate(cfg)
