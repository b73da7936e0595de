"""What the commands ask a model family, one protocol per caller, and :class:`Family`, their sum.

Every family is one object per model (a class with its constants as attributes). The protocols say
which methods each caller uses; :class:`Family` implements the optional ones with defaults (a
capability the family lacks raises :class:`CapabilityError` naming the family and what it cannot do).

Conventions:

- ``cfg``: the run's config (``ml_collections.ConfigDict`` with the trainer's keys and this family's
  :attr:`Family.Config` keys); ``model_config``: the teacher's model config dict (``teacher.config``);
- *inputs*: a pytree whose every leaf has the batch on its leading axis (what :meth:`Training.apply`
  takes); the trainer splits them into micro-batches and shards them over the mesh;
- *batch*: what a data source's ``batch(position, n, host_index=, host_count=)`` returns, a dict of
  host ``numpy`` arrays with ``n`` rows;
- *model*: an NNX module, the teacher or the quantized student (the same structure).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from fraqat_jax.family.settings import ConfigError

__all__ = ["CapabilityError", "Data", "Evaluation", "Export", "Family", "Generation", "PipelineComponents", "Teachers",
           "Training"]


class CapabilityError(ConfigError):
    """The family cannot do what was asked (``family 'x' cannot generate images``)."""


@dataclasses.dataclass(frozen=True)
class PipelineComponents:
    """What the phone export of a text-to-image run writes: its three networks (NNX modules, traced
    at batch 1) and what the host needs to run them from a prompt.

    ``text_encoder``: ``(input_ids [1, L] int, attention_mask [1, L] float 0/1) -> [1, L, D]``;
    ``transformer``: the trained student, called ``(hidden_states, timestep, encoder_hidden_states,
    encoder_attention_mask)``; ``vae_decoder``: raw latents ``[1, C, h, w]`` (the sampler's latents
    over the autoencoder's ``scaling_factor``) -> images ``[1, c, H, W]`` in [-1, 1].
    ``tokenizer_file``: a ``tokenizers`` JSON file; ``text_length``, ``pad_id`` and ``lowercase``:
    how a prompt becomes ``input_ids`` (padded on the right; lower-cased and stripped first when
    ``lowercase``). ``sampler``: the manifest's scheduler settings (``name``, its schedule,
    ``steps``, ``guidance``); ``latent_shape``: ``(1, C, h, w)``. ``prompts``: training prompts
    (calibration, spread over what they ask for, any prefix a fair sample); ``heldout_prompts``:
    prompts never trained on (the agreement figures)."""

    text_encoder: Any
    transformer: Any
    vae_decoder: Any
    tokenizer_file: str
    text_length: int
    pad_id: int
    lowercase: bool
    sampler: Mapping[str, Any]
    latent_shape: tuple[int, ...]
    prompts: Sequence[str]
    heldout_prompts: Sequence[str]


@runtime_checkable
class Training(Protocol):
    """What the train step needs (inside ``jit``)."""

    def training_inputs(self, key, batch: Mapping[str, Any], cfg):
        """Inputs of one step from the global ``batch``; ``key``: ``fold_in(key(seed), step)``."""

    def apply(self, model, inputs):
        """The model's output for ``inputs`` (any layout :meth:`loss` expects)."""

    def loss(self, student_out, teacher_out, inputs):
        """The distillation loss, a float32 scalar (mean over the batch)."""

    def default_rules(self, cfg) -> list:
        """The student's quantization rules for ``quant_rules=paper``."""


@runtime_checkable
class Teachers(Protocol):
    """Where the teacher comes from."""

    def teacher_class(self, teacher: str) -> str | None:
        """The model class name a ``teacher=`` value names when this family reads that kind of value."""

    def teacher_spec(self, cfg) -> tuple[type, dict]:
        """``(port class, model_config)`` of ``cfg.teacher`` without reading weights."""

    def load_teacher(self, cfg):
        """The teacher as an NNX module (weights loaded)."""

    def teacher_builder(self, cfg) -> Callable:
        """A function of no arguments building the teacher's structure with random weights."""

    def teacher_folder(self, cfg) -> str | None:
        """The teacher's model folder (its tokenizer, its pipeline components), None when it has none."""

    def port(self, class_name: str) -> type:
        """The port class called ``class_name`` (one of :attr:`Family.model_classes`): an export
        rebuilds the model's structure from it and the saved model config."""


@runtime_checkable
class Data(Protocol):
    """The family's data and its own config keys."""

    Config: ClassVar[type | None]

    def validate_config(self, cfg) -> None:
        """Raises :class:`ConfigError` naming the first bad value of the family's keys and ``data``."""

    def make_source(self, cfg, model_config: Mapping[str, Any], sample_teacher: Callable | None = None, *,
                    seed: int | None = None):
        """The run's data source for ``cfg.data``, checked against the teacher."""

    def heldout_inputs(self, cfg, model_config, rows, key, num: int, sample_teacher: Callable | None = None):
        """Training-style inputs of ``num`` held-out examples (validation losses, calibration)."""

    def calibration_inputs(self, cfg, model_config, rows, key, num: int, batch_size: int,
                           sample_teacher: Callable | None = None) -> list:
        """:meth:`heldout_inputs` cut into batches of ``batch_size`` rows."""

    def example_batch(self, model_config, **size) -> dict:
        """``{name: (per-example shape, dtype name)}`` of a data batch (planning compiles on these)."""

    def example_size(self, cfg, model_config) -> dict:
        """The size keywords of :meth:`example_batch` at which run ``cfg`` trains."""


@runtime_checkable
class Evaluation(Protocol):
    """What evaluation needs: which evaluator scores the family's students and with what settings."""

    #: ``"outputs"`` (validation loss on held-out inputs, and sample metrics when the family
    #: generates), ``"text"`` (perplexity, KL, tasks) or ``"images"`` (outputs + image sample metrics).
    evaluation: ClassVar[str]

    def eval_settings(self, cfg, model_config) -> dict:
        """The evaluator's per-family numbers (e.g. sample shape, class count); ``{}`` when none."""


@runtime_checkable
class Export(Protocol):
    """What export needs."""

    #: The export's model format: ``"diffusers"`` (a transformer called with keyword inputs) or
    #: ``"transformers"`` (a language model written as a transformers folder).
    export_format: ClassVar[str]

    def model_kwargs(self, inputs) -> dict:
        """The keyword arguments of the model's ``__call__`` for training-style ``inputs`` (an exported
        graph's inputs)."""

    def pipeline_components(self, cfg, student) -> PipelineComponents:
        """The networks and host settings of run ``cfg``'s text-to-image phone pipeline, with the
        trained ``student`` as its transformer; :class:`CapabilityError` when the run has no such
        pipeline (its folder holds the one network)."""

    def single_network_manifest(self, cfg, model_config) -> dict:
        """The keys of ``pipeline.json`` (the host runner's manifest) that describe a folder holding
        this family's one exported network: its conditioning, inputs, sampler and latent shape."""

    #: Whether :meth:`cached_step` is implemented (a language model exported as prefill and decode
    #: graphs against a host-side KV cache).
    decodes_with_cache: ClassVar[bool]

    def cached_step(self, model):
        """``model`` as one fixed-shape step against a host-side KV cache: a module called with
        ``input_ids``, masks, RoPE tables and the past keys/values, returning the logits and the new
        keys/values (the prefill and decode graphs of a phone export)."""


@runtime_checkable
class Generation(Protocol):
    """What generation needs: the run's sample files, and text or images from a trained model."""

    #: What :meth:`generate_text` / :meth:`generate_images` accept: a subset of
    #: ``{"text", "labels", "prompts"}`` (empty: the family generates nothing).
    generates: ClassVar[frozenset]

    def teacher_sampler(self, cfg, build: Callable, out_shardings=None, **options) -> Callable:
        """``sample(params, prompts) -> samples``, jitted; ``build(params)`` returns the model."""

    def sample_prompts(self, cfg, model_config, source, num: int, *, seed: int | None = None):
        """Fixed prompts (a pytree) that teacher and student sample from."""

    def take_prompts(self, prompts, start: int, stop: int):
        """Rows ``start:stop`` of ``prompts`` (evaluation samples in batches)."""

    def sample_like(self, cfg, model_config, build: Callable, params, inputs, *, num_steps: int, seed: int = 0):
        """Samples of ``build(params)`` (jitted) from fresh noise shaped like training-style ``inputs``,
        conditioned as they are: the same call on two models compares their samples (an export's check)."""

    def prompt_labels(self, prompts):
        """The class labels ``prompts`` ask for (class-conditional models), else None."""

    def write_samples(self, path_stem: str, teacher_samples, student_samples) -> tuple[str, Any]:
        """Writes teacher and student samples side by side; ``(path, image array or None)``."""

    def generate_text(self, model, cfg, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                      seed: int = 0) -> list[str]:
        """Continuations of ``prompts`` (strings) by ``model``."""

    def generate_images(self, model, cfg, *, labels: Sequence[int] | None = None, prompts=None,
                        num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0):
        """Images ``[N, H, W, C]`` uint8 from class ``labels`` or encoded ``prompts``."""


class Family:
    """One model family: the sum of :class:`Training`, :class:`Teachers`, :class:`Data`,
    :class:`Evaluation`, :class:`Export` and :class:`Generation`. A subclass sets :attr:`name`,
    :attr:`model_classes` and :attr:`Config`, implements the methods without a default, and is
    registered (``fraqat_jax.families`` entry point, or :func:`fraqat_jax.family.register`)."""

    #: Short name, e.g. ``"dit"``; what a plan report and an export report call the family.
    name: ClassVar[str] = ""
    #: Class names of the model ports this family drives (``type(model).__name__``).
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: The family's own config keys: a frozen dataclass of :func:`fraqat_jax.family.settings.setting`
    #: fields (None: no keys of its own).
    Config: ClassVar[type | None] = None
    evaluation: ClassVar[str] = "outputs"
    export_format: ClassVar[str] = "diffusers"
    generates: ClassVar[frozenset] = frozenset()

    def __repr__(self) -> str:
        return f"<family {self.name!r}>"

    def _cannot(self, what: str) -> CapabilityError:
        return CapabilityError(f"family {self.name!r} cannot {what}")

    # -- Training ------------------------------------------------------------------------------------
    def training_inputs(self, key, batch, cfg):
        raise NotImplementedError

    def apply(self, model, inputs):
        raise NotImplementedError

    def loss(self, student_out, teacher_out, inputs):
        raise NotImplementedError

    def default_rules(self, cfg) -> list:
        from fraqat_jax.nn.rules import config_rules

        return config_rules(cfg)

    # -- Teachers ------------------------------------------------------------------------------------
    def teacher_class(self, teacher: str) -> str | None:
        raise NotImplementedError

    def teacher_spec(self, cfg) -> tuple[type, dict]:
        raise NotImplementedError

    def load_teacher(self, cfg):
        raise NotImplementedError

    def teacher_builder(self, cfg) -> Callable:
        raise NotImplementedError

    def teacher_folder(self, cfg) -> str | None:
        return None

    def port(self, class_name: str) -> type:
        raise NotImplementedError

    # -- Data ------------------------------------------------------------------------------------
    def validate_config(self, cfg) -> None:
        pass

    def make_source(self, cfg, model_config, sample_teacher=None, *, seed=None):
        raise NotImplementedError

    def heldout_inputs(self, cfg, model_config, rows, key, num, sample_teacher=None):
        raise NotImplementedError

    def calibration_inputs(self, cfg, model_config, rows, key, num, batch_size, sample_teacher=None) -> list:
        import jax

        inputs = self.heldout_inputs(cfg, model_config, rows, key, num, sample_teacher)
        return [jax.tree.map(lambda a: a[i:i + batch_size], inputs) for i in range(0, num, batch_size)]

    def example_batch(self, model_config, **size) -> dict:
        raise NotImplementedError

    def example_size(self, cfg, model_config) -> dict:
        return {}

    # -- Evaluation ------------------------------------------------------------------------------------
    def eval_settings(self, cfg, model_config) -> dict:
        return {}

    # -- Export ------------------------------------------------------------------------------------
    def model_kwargs(self, inputs) -> dict:
        raise self._cannot("be exported as a graph (no model_kwargs)")

    def pipeline_components(self, cfg, student) -> PipelineComponents:
        raise self._cannot("export a text-to-image phone pipeline (no pipeline components)")

    def single_network_manifest(self, cfg, model_config) -> dict:
        raise self._cannot("describe a one-network phone folder (no single_network_manifest)")

    decodes_with_cache: ClassVar[bool] = False

    def cached_step(self, model):
        raise self._cannot("be exported as prefill and decode graphs (no cached step)")

    # -- Generation ------------------------------------------------------------------------------------
    def teacher_sampler(self, cfg, build, out_shardings=None, **options):
        raise self._cannot("sample")

    def sample_prompts(self, cfg, model_config, source, num, *, seed=None):
        raise self._cannot("sample")

    def take_prompts(self, prompts, start, stop):
        import jax

        return jax.tree.map(lambda a: a[start:stop], prompts)

    def prompt_labels(self, prompts):
        return None

    def sample_like(self, cfg, model_config, build, params, inputs, *, num_steps, seed=0):
        raise self._cannot("sample")

    def write_samples(self, path_stem, teacher_samples, student_samples):
        raise self._cannot("write samples")

    def generate_text(self, model, cfg, prompts, *, max_new_tokens, temperature=0.0, seed=0):
        raise self._cannot("generate text")

    def generate_images(self, model, cfg, *, labels=None, prompts=None, num_steps=None, guidance_scale=None, seed=0):
        what = "from labels" if labels is not None else "from prompts" if prompts is not None else ""
        raise self._cannot(f"generate images {what}".strip())

    @property
    def can_sample(self) -> bool:
        """Whether the family overrides :meth:`teacher_sampler` (runs write sample files, evaluation
        compares samples)."""
        return type(self).teacher_sampler is not Family.teacher_sampler
