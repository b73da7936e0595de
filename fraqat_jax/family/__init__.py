"""family/: the model-family interface, the seam between the generic trainer and a kind of model.

A *family* answers every question whose answer depends on what the model is (an image diffusion
transformer, a language model, ...): what it trains on, how it is called, what its loss is, what
a run writes as samples, how its teachers are found, which layers it quantizes by default.
``train/`` asks the family and never names one; ``diffusion/`` implements :class:`Family` for its
five families (DiT, PixArt, SD3, Sana, Flux), ``text/`` for language models. A new family joins
by subclassing :class:`Family` and calling :func:`register` when its package is imported; the
packages named in :data:`PROVIDERS` are imported on the first lookup.

Conventions every method keeps:

- ``cfg`` is the run's ``ml_collections.ConfigDict`` (every key of every family is present, with
  its default when the run did not set it);
- *inputs* are a pytree of arrays whose every leaf has the batch on its leading axis (diffusion:
  ``(x_t [B, C, H, W], t [B], cond {name: [B, ...]})``; text: ``{"input_ids": [B, T] int32, ...}``);
  the trainer splits them into micro-batches along that axis and shards them over the mesh;
- a *batch* is what a data source's ``batch(position, n, host_index=, host_count=)`` returns: a
  dict of host ``numpy`` arrays with ``n`` rows;
- a *model* is an NNX module, the teacher or the quantized student (the same structure).

This part imports nothing of the package at import time (the providers are imported by name on
the first lookup), so every part may import it.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, Mapping

__all__ = ["ConfigError", "Family", "FamilyError", "PROVIDERS", "all_config_keys", "families", "family_for_model",
           "family_for_teacher", "register"]

#: Packages that register families when imported (imported by name on the first lookup).
PROVIDERS = ("fraqat_jax.diffusion", "fraqat_jax.text")


class ConfigError(ValueError):
    """A bad config file, key or value (the message names it and what is allowed); the trainer's
    command line prints it on one line and exits 2."""


class FamilyError(ConfigError):
    """No registered family takes this model or teacher (the message names it and lists the supported)."""


class Family(abc.ABC):
    """One model family. Subclass it, set :attr:`name` and :attr:`model_classes`, implement every
    abstract method and :func:`register` an instance."""

    #: Short name, e.g. ``"dit"``, ``"sd3"``, ``"gemma2"``.
    name: str = ""
    #: Class names of the model ports this family drives (``type(model).__name__``).
    model_classes: tuple[str, ...] = ()

    # ---------------------------------------------------------------- configuration

    def config_keys(self) -> Mapping[str, tuple[Any, str]]:
        """The family's own config keys: ``{key: (default, help)}`` (diffusion: ``image_size``,
        ``num_train_timesteps``, ...; text: ``seq_len``, the loss). Keys shared by several families
        must have the same default. The trainer's ``--help`` lists them with the trainer's keys."""
        return {}

    def validate_config(self, cfg) -> None:
        """Raises :class:`ConfigError` naming the first bad value of this family's keys (and of ``data``,
        whose forms the family defines). Called for the family of the run's teacher."""

    # ---------------------------------------------------------------- teachers

    @abc.abstractmethod
    def teacher_class(self, teacher: str) -> str | None:
        """The model class name that the ``teacher=`` value names, when this family can read that
        kind of value (a built-in name, ``preset:NAME``, a model folder or file), else None. Cheap: no
        weights are read. The registry picks the family whose :attr:`model_classes` hold the name."""

    @abc.abstractmethod
    def teacher_spec(self, cfg) -> tuple[type, dict]:
        """``(port class, model config dict)`` of ``cfg.teacher``, without reading weights."""

    @abc.abstractmethod
    def load_teacher(self, cfg):
        """The teacher as an NNX module in ``cfg.dtype`` / ``cfg.param_dtype`` (weights loaded)."""

    @abc.abstractmethod
    def teacher_builder(self, cfg) -> Callable:
        """A function of no arguments that builds the teacher's structure with random weights, as
        :meth:`load_teacher` would (dtypes, options): under ``nnx.eval_shape`` it gives the abstract
        teacher and student for ahead-of-time planning, nothing allocated and no weights read."""

    # ---------------------------------------------------------------- quantization

    def default_rules(self, cfg) -> list:
        """The student's quantization rules for ``quant_rules=paper`` (``fraqat_jax.Rule`` list,
        first match wins): each ``keep`` entry, then every ``Linear`` layer with weights from 8 bits
        down (the schedule sets them each step) and activations at ``act_bits``, ranges and scales
        as the config says. A family whose layers differ overrides this."""
        from fraqat_jax.nn.rules import config_rules

        return config_rules(cfg)

    # ---------------------------------------------------------------- data and inputs

    @abc.abstractmethod
    def make_source(self, cfg, teacher_config: Mapping[str, Any], sample_teacher: Callable | None = None, *,
                    seed: int | None = None):
        """The run's data source for ``cfg.data`` (a ``fraqat_jax.data`` source: ``batch(position, n,
        host_index=0, host_count=1) -> {name: np.ndarray [n, ...]}`` and ``element_spec``), checked
        against the teacher before anything compiles. For a data-free run the examples come from
        the teacher: ``sample_teacher(prompts)`` is :meth:`teacher_sampler`'s callable with the
        teacher's parameters bound. ``seed``: the source's own seed (default: the run's data stream,
        ``fraqat_jax.data.streams``)."""

    @abc.abstractmethod
    def training_inputs(self, key, batch: Mapping[str, Any], cfg):
        """The model inputs of one training step (inside ``jit``): ``batch`` is the global batch as
        arrays, ``key`` a JAX key (``fold_in(key(seed), step)``: a resumed run draws the same).
        Diffusion: noise and timesteps; text: the token windows (no randomness)."""

    @abc.abstractmethod
    def apply(self, model, inputs):
        """The model's output for ``inputs`` (float; any layout the loss expects)."""

    @abc.abstractmethod
    def loss(self, student_out, teacher_out, inputs):
        """The distillation loss, a float32 scalar (the mean over the batch): diffusion, the mean
        squared error over every output channel; text, the forward KL of the token distributions."""

    @abc.abstractmethod
    def heldout_inputs(self, cfg, teacher_config: Mapping[str, Any], rows: Mapping[str, Any] | None, key,
                       num: int, sample_teacher: Callable | None = None):
        """Training-style inputs for ``num`` held-out examples, drawn from ``key`` (a key training
        never uses). ``rows``: clean examples from the data (``None`` for a data-free run, whose
        examples come from ``sample_teacher``). Validation losses and calibration feed these."""

    def calibration_inputs(self, cfg, teacher_config: Mapping[str, Any], rows: Mapping[str, Any] | None, key,
                           num: int, batch_size: int, sample_teacher: Callable | None = None) -> list:
        """:meth:`heldout_inputs` of ``num`` examples cut into batches of ``batch_size`` rows (static
        activation ranges are calibrated on them: the trainer before its first step, the export)."""
        import jax

        inputs = self.heldout_inputs(cfg, teacher_config, rows, key, num, sample_teacher)
        return [jax.tree.map(lambda a: a[i:i + batch_size], inputs) for i in range(0, num, batch_size)]

    @abc.abstractmethod
    def example_batch(self, model_config: Mapping[str, Any], **size) -> dict:
        """``{name: (per-example shape, dtype name)}`` of the batches a data source yields for a model
        of ``model_config``: plan compiles the step on random batches of it, with no data. ``size``:
        the family's size keywords (diffusion: ``latent_size``; text: ``seq_len``)."""

    @abc.abstractmethod
    def example_size(self, cfg, model_config: Mapping[str, Any]) -> dict:
        """The size keywords of :meth:`example_batch` at which the run ``cfg`` trains on a model of
        ``model_config`` (diffusion: ``{"latent_size": image_size or the teacher's sample_size}``;
        text: ``{"seq_len": cfg.seq_len}``): ``plan`` compiles the step on batches of
        ``example_batch(model_config, **example_size(cfg, model_config))``."""

    # ---------------------------------------------------------------- samples

    @abc.abstractmethod
    def teacher_sampler(self, cfg, build: Callable, out_shardings=None, **options) -> Callable:
        """``sample(params, prompts) -> samples``, jitted: what the family generates from a model,
        ``build(params)`` returning the model to run (a teacher, or a student with its bit-width
        set: one compilation serves both). ``prompts`` is :meth:`sample_prompts`'s value (diffusion:
        noise, key, conditioning; text: prompt tokens). Sample files and data-free examples use it;
        ``options`` are the family's (diffusion: ``guidance_scale``)."""

    @abc.abstractmethod
    def sample_prompts(self, cfg, teacher_config: Mapping[str, Any], source, num: int):
        """The fixed prompts the run samples teacher and student from (a pytree; the same every time
        for a seed, so teacher and student samples line up row for row)."""

    @abc.abstractmethod
    def write_samples(self, path_stem: str, teacher_samples, student_samples) -> tuple[str, Any]:
        """Writes teacher and student samples side by side to ``path_stem`` plus the family's suffix
        (diffusion: a PNG grid, teacher above student; text: a ``.txt`` of generations). Returns
        ``(path, image)`` where ``image`` is an ``[H, W, C]`` uint8 array for TensorBoard, or None."""


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Adds ``family``; its :attr:`~Family.model_classes` must not belong to another family."""
    if not family.name or not family.model_classes:
        raise ValueError(f"family {family!r} needs a name and model_classes")
    for other in _REGISTRY.values():
        clash = set(other.model_classes) & set(family.model_classes)
        if clash and other.name != family.name:
            raise ValueError(f"model classes {sorted(clash)} already belong to family {other.name!r}")
    _REGISTRY[family.name] = family
    return family


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in PROVIDERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a provider that exists but fails to import is a bug, not an absence
                raise


def families() -> dict[str, Family]:
    """Every registered family by name."""
    _load_providers()
    return dict(_REGISTRY)


def _supported() -> str:
    return ", ".join(c for f in families().values() for c in f.model_classes)


def family_for_model(model) -> Family:
    """The family of a model instance, a model class or a class name (``FamilyError`` if none)."""
    name = model if isinstance(model, str) else (model.__name__ if isinstance(model, type) else type(model).__name__)
    for family in families().values():
        if name in family.model_classes:
            return family
    raise FamilyError(f"teacher class {name!r} is not supported; supported: {_supported()}")


def family_for_teacher(teacher: str) -> Family:
    """The family whose models ``teacher`` (a ``teacher=`` config value) names (``FamilyError``
    naming the class it found and the supported ones when none does)."""
    seen = []
    for family in families().values():
        cls = family.teacher_class(teacher)
        if cls is None:
            continue
        if cls in family.model_classes:
            return family
        seen.append(cls)
    for cls in seen:  # read by one family's reader, driven by another
        for family in families().values():
            if cls in family.model_classes:
                return family
    what = f"a {seen[0]}" if seen else "not a model folder, file, preset or built-in name any family reads"
    raise FamilyError(f"teacher={teacher!r} is {what}, which is not supported as a teacher; supported: {_supported()}")


def all_config_keys() -> dict[str, tuple[Any, str]]:
    """The union of every family's :meth:`~Family.config_keys` (a key two families share keeps the
    first one's help; their defaults must agree)."""
    out: dict[str, tuple[Any, str]] = {}
    for family in families().values():
        for key, (default, text) in family.config_keys().items():
            if key in out and out[key][0] != default:
                raise ValueError(f"config key {key!r}: family {family.name!r} gives default {default!r}, "
                                 f"another gives {out[key][0]!r}")
            out.setdefault(key, (default, text))
    return out

