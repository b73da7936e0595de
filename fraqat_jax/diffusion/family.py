"""The five diffusion families, one object per model: :data:`DIT`, :data:`PIXART`, :data:`SD3`,
:data:`SANA`, :data:`FLUX` (``fraqat_jax.families`` entry points).

:class:`DiffusionFamily` holds what they share; each subclass carries its model's constants as
class attributes (training objective, evaluation sampler, timestep convention, 2x2 packing, text
tokens and widths, its VAE, its diffusers pipeline and that pipeline's sampling defaults). Training
inputs are DDPM noise and uniform timesteps (DiT, PixArt) or rectified-flow interpolants with
logit-normal sigma (SD3, Sana, Flux); the loss is the mean squared error over every output channel;
samples are PNG grids, teacher above student, from the same noise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import data
from fraqat_jax.data import captions
from fraqat_jax.data.streams import stream
from fraqat_jax.diffusion import teachers
from fraqat_jax.diffusion.families import apply_model, model_kwargs
from fraqat_jax.diffusion.grids import save_grid
from fraqat_jax.diffusion.heldout import heldout_inputs, sampling_inputs, teacher_examples
from fraqat_jax.diffusion.noise import diffusion_inputs
from fraqat_jax.diffusion.samplers import make_noise, model_sampler
from fraqat_jax.family import ConfigError, Family
from fraqat_jax.family.settings import int_at_least, setting
from fraqat_jax.models.registry import port_class

__all__ = ["DIT", "DiffusionConfig", "DiffusionFamily", "FAMILIES", "FLUX", "PIXART", "SANA", "SD3"]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion families' own config keys."""

    #: resize TFDS images to this size (0: the teacher's sample_size)
    image_size: int = setting(0, "resize TFDS images to this size (0: the teacher's sample_size)", int_at_least(0))
    #: DDPM training timesteps (DDPM families)
    num_train_timesteps: int = setting(1000, "DDPM training timesteps (DiT, PixArt)", int_at_least(1))
    #: mean of the logit-normal timestep density (rectified flow)
    logit_mean: float = setting(0.0, "rectified flow: mean of the logit-normal timestep density")
    #: std of the logit-normal timestep density (rectified flow)
    logit_std: float = setting(1.0, "rectified flow: std of the logit-normal timestep density")
    #: sampler steps of the sample grids and the data-free source
    sample_steps: int = setting(20, "sampler steps for the PNG grids and the data-free source", int_at_least(1))
    #: classifier-free guidance of the sample grids
    guidance_scale: float = setting(1.0, "classifier-free guidance for the PNG grids (1: none)")


DATA_FORMS = "digits, captions, datafree, tfds:NAME[:SPLIT] or latents:DIR"


class _Sampler:
    """``sample(params, (noise, key, cond, null_cond)) -> images [B, C, H, W]`` over a jitted sampler."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, params, prompts):
        noise, key, cond, null = prompts
        return self.jitted(params, noise, cond, key, null)


class DiffusionFamily(Family):
    """What the diffusion families share; a subclass per model sets the class attributes."""

    Config = DiffusionConfig
    evaluation = "images"
    export_format = "diffusers"
    #: ``"ddpm"`` (epsilon prediction) or ``"flow"`` (rectified-flow velocity)
    objective: ClassVar[str] = "ddpm"
    #: the deterministic evaluation sampler: ``"ddim"`` (DDPM), ``"euler"`` or ``"flow_dpm"`` (flow)
    sampler: ClassVar[str] = "ddim"
    #: a flow model's timestep per unit of sigma (None for DDPM)
    timesteps_per_sigma: ClassVar[float | None] = None
    #: the model takes 2x2-packed latent tokens (Flux)
    packed_2x2: ClassVar[bool] = False
    #: class labels condition the model (DiT); else cached text embeddings
    class_conditional: ClassVar[bool] = False
    #: text tokens of the diffusers pipeline's default (cached embeddings per example)
    text_tokens: ClassVar[int] = 0
    #: the model takes a pooled text embedding (``pooled_projections``)
    pooled: ClassVar[bool] = False
    #: pixels per latent: the VAE's downsampling factor
    vae_factor: ClassVar[int] = 8
    #: the diffusers class of the pipeline's VAE
    vae_class: ClassVar[str] = "AutoencoderKL"
    #: the diffusers pipeline class that runs this transformer
    pipeline_class: ClassVar[str] = ""
    #: the pipeline's sampling defaults (``sample_steps``, ``guidance_scale``, ``shift``); None: the
    #: family is not text-to-image
    pipeline_defaults: ClassVar[dict | None] = None
    #: the pipeline's scheduler config may carry a flow time shift (``shift`` / ``flow_shift``)
    scheduler_shift: ClassVar[bool] = True

    # -- configuration ---------------------------------------------------------------------------

    def validate_config(self, cfg) -> None:
        spec = cfg.data
        if not (spec in ("digits", "captions", "datafree") or spec.startswith("tfds:") or spec.startswith("latents:")):
            raise ConfigError(f"data={spec!r} is not allowed: use {DATA_FORMS}")
        if spec == "captions" and teachers.teacher_pipeline(cfg.teacher) is None:  # -- captioned digits
            raise ConfigError(f"data=captions needs a text-to-image pipeline teacher (e.g. builtin:sana), got "
                              f"teacher={cfg.teacher!r}, which has no text encoder, autoencoder and captions")
        if spec.startswith("latents:") and not os.path.isdir(spec[len("latents:"):]):
            raise ConfigError(f"data={spec!r}: latents directory {spec[len('latents:'):]!r} does not exist")

    # -- teachers --------------------------------------------------------------------------------

    def teacher_class(self, teacher: str) -> str | None:
        return teachers.teacher_class(teacher)

    def teacher_spec(self, cfg):
        return teachers.teacher_spec(cfg)

    def load_teacher(self, cfg):
        return teachers.load_teacher(cfg)

    def teacher_builder(self, cfg) -> Callable:
        cls, config = teachers.teacher_spec(cfg)
        return lambda: cls(config, rngs=nnx.Rngs(cfg.seed), **teachers.build_options(cfg))

    def teacher_folder(self, cfg) -> str | None:
        t = cfg.teacher
        return teachers.teacher_pipeline(t) or (t if os.path.isdir(t) else None)

    def port(self, class_name: str) -> type:
        return port_class(class_name)

    # -- model constants ---------------------------------------------------------------------------

    def latent_channels(self, model_config) -> int:
        """Channels of the latents the model denoises (unpacked)."""
        c = int(model_config.get("in_channels", 4))
        return c // 4 if self.packed_2x2 else c

    def text_width(self, model_config) -> tuple[str, int]:
        """``(config key, width)`` of the text embeddings the model takes."""
        width = model_config.get("caption_channels")
        if width is None:  # without a caption projection, captions come at the model's own width
            return ("num_attention_heads * attention_head_dim",
                    int(model_config["num_attention_heads"] * model_config["attention_head_dim"]))
        return "caption_channels", int(width)

    def patch_size(self, model_config) -> int:
        """Latent pixels per token side."""
        return 2 if self.packed_2x2 else int(model_config.get("patch_size", 1) or 1)

    def sample_shape(self, cfg, model_config) -> tuple[int, int, int]:
        """``(C, H, W)`` of one clean example: the teacher's channels, ``image_size`` or its sample size."""
        size = int(cfg.image_size or model_config.get("sample_size", 8))
        return self.latent_channels(model_config), size, size

    def num_classes(self, model_config) -> int | None:
        """The class count of a class-conditional model (its null class is this number), else None."""
        n = model_config.get("num_embeds_ada_norm")
        return int(n) if n and self.class_conditional else None

    # -- data and inputs ---------------------------------------------------------------------------

    def make_source(self, cfg, model_config, sample_teacher=None, *, seed: int | None = None):
        shape = self.sample_shape(cfg, model_config)
        if cfg.data == "captions":  # -- captioned digits through the teacher pipeline's own text encoder and DC-AE
            source = captions.captioned_digits(teachers.teacher_pipeline(cfg.teacher),
                                               seed=cfg.seed if seed is None else seed)
            data.check_fits_teacher(cfg.data, source.element_spec, model_config, family=self.name)
            return source
        if cfg.data != "datafree":
            source = data.make_source(cfg.data, seed=cfg.seed if seed is None else seed, image_size=shape[1],
                                      data_dir=cfg.data_dir or None)
            # before anything compiles: a size or channel count the teacher cannot take, named here
            data.check_fits_teacher(cfg.data, source.element_spec, model_config, family=self.name,
                                    packed=self.packed_2x2)
            return source
        if not self.class_conditional:
            raise ConfigError(f"data=datafree needs a class-conditional teacher, got a {self.name} teacher "
                              "(text-to-image teachers need cached text embeddings: data=latents:DIR)")
        num_classes = self.num_classes(model_config)

        def generate(key, n):
            return teacher_examples(key, n, shape, num_classes, lambda noise, cond, k: sample_teacher((noise, k, cond, None)))

        spec = {"latents": (shape, np.dtype(np.float32)), "class_labels": ((), np.dtype(np.int32))}
        return data.DataFreeSource(generate, spec, seed=stream(cfg.seed, "datafree") if seed is None else seed)

    def training_inputs(self, key, batch, cfg):
        latents = batch["latents"]
        cond = {k: v for k, v in batch.items() if k != "latents"}
        x_t, t = diffusion_inputs(self, key, latents, num_train_timesteps=int(cfg.num_train_timesteps),
                                  logit_mean=float(cfg.logit_mean), logit_std=float(cfg.logit_std))
        return x_t, t, cond

    def apply(self, model, inputs):
        return apply_model(model, self, *inputs)

    def loss(self, student_out, teacher_out, inputs):
        return jnp.mean(jnp.square(student_out.astype(jnp.float32) - teacher_out.astype(jnp.float32)))

    def heldout_inputs(self, cfg, model_config, rows, key, num, sample_teacher=None):
        sample_clean = None
        if sample_teacher is not None:
            sample_clean = lambda noise, cond, k: sample_teacher((noise, k, cond, None))  # noqa: E731
        n_cls = model_config.get("num_embeds_ada_norm")
        return heldout_inputs(self, key, rows=rows, sample_clean=sample_clean, num=num,
                              sample_shape=self.sample_shape(cfg, model_config),
                              num_classes=int(n_cls) if n_cls else None,
                              num_train_timesteps=int(cfg.num_train_timesteps), logit_mean=float(cfg.logit_mean),
                              logit_std=float(cfg.logit_std))

    def example_batch(self, model_config, *, latent_size: int) -> dict:
        """Per-example batch fields ``{name: (shape, dtype name)}`` at latent height = width
        ``latent_size``: latents and, for text-to-image families, cached text embeddings
        ``encoder_hidden_states [L, D]`` (and ``pooled_projections [D']`` where pooled)."""
        s = int(latent_size)
        spec = {"latents": ((self.latent_channels(model_config), s, s), "float32")}
        if self.class_conditional:
            return {**spec, "class_labels": ((), "int32")}
        spec["encoder_hidden_states"] = ((self.text_length(model_config), self.default_text_width(model_config)),
                                         "float32")
        if self.pooled:
            spec["pooled_projections"] = ((int(model_config.get("pooled_projection_dim", 2048)),), "float32")
        return spec

    def text_length(self, model_config) -> int:
        """Text tokens per example of the pipeline's default."""
        return self.text_tokens

    def default_text_width(self, model_config) -> int:
        """The text embedding width, with the pipeline's default when the config leaves it out."""
        return int(model_config.get("caption_channels", 4096))

    def example_size(self, cfg, model_config) -> dict:
        return {"latent_size": self.sample_shape(cfg, model_config)[1]}

    def prompt_pipeline(self, cfg, *, vae: str | None = None):
        """The teacher's whole prompt-to-image pipeline (``fraqat_jax.diffusion.pipeline``:
        text encoder, autoencoder, scheduler settings), loaded; ``PipelineError`` (a ``ValueError``)
        when the teacher is no such pipeline folder."""
        from fraqat_jax.diffusion.pipeline import PromptPipeline, pipeline_folder

        return PromptPipeline(pipeline_folder(cfg.teacher), self, vae=vae)

    def write_pipeline(self, cfg, out: str, write_transformer: Callable[[str], dict]) -> dict | None:
        """When the teacher is a whole pipeline folder: writes it to ``out`` with ``transformer/``
        written by ``write_transformer(dir)`` (``fraqat_jax.diffusion.pipeline.write_pipeline``) and
        returns that call's dict plus ``pipeline_class`` and the copied ``parts``; else None."""
        from fraqat_jax.diffusion.pipeline import PipelineError, pipeline_folder, write_pipeline

        try:
            folder = pipeline_folder(cfg.teacher)
        except PipelineError:
            return None
        return write_pipeline(folder, out, write_transformer)

    # -- evaluation and export -------------------------------------------------------------------------

    def eval_settings(self, cfg, model_config) -> dict:
        return {"sampler": self.sampler, "objective": self.objective,
                "sample_shape": self.sample_shape(cfg, model_config), "num_classes": self.num_classes(model_config)}

    def single_network_manifest(self, cfg, model_config) -> dict:
        """The ``pipeline.json`` keys of a one-network phone folder: conditioning, label or text inputs,
        the sampler and the latent shape (``fraqat_jax.diffusion.phone``)."""
        from fraqat_jax.diffusion.phone import single_network_settings

        return single_network_settings(self, model_config, cfg, self.sample_shape(cfg, model_config))

    def model_kwargs(self, inputs) -> dict:
        x_t, t, cond = inputs
        return model_kwargs(self, x_t, t, cond)

    # -- samples -----------------------------------------------------------------------------------

    def teacher_sampler(self, cfg, build, out_shardings=None, *, guidance_scale: float | None = None,
                        num_steps: int | None = None, shift: float | None = None):
        scale = float(cfg.guidance_scale) if guidance_scale is None else float(guidance_scale)
        steps = int(cfg.sample_steps) if num_steps is None else int(num_steps)
        return _Sampler(model_sampler(build, self, num_steps=steps, guidance_scale=scale, shift=shift,
                                      out_shardings=out_shardings))

    def sample_prompts(self, cfg, model_config, source, num, *, seed: int | None = None):
        rows = None if self.class_conditional or source is None else source.batch(0, num)
        return sampling_inputs(self, stream(cfg.seed, "sample_grid") if seed is None else int(seed), num,
                               self.sample_shape(cfg, model_config), num_classes=self.num_classes(model_config),
                               cond_rows=rows)

    def sample_like(self, cfg, model_config, build, params, inputs, *, num_steps, seed=0):
        x_t, _, cond = inputs
        prompts = sampling_inputs(self, seed, x_t.shape[0], tuple(x_t.shape[1:]),
                                  num_classes=self.num_classes(model_config), cond_rows=cond)
        return self.teacher_sampler(cfg, build, num_steps=num_steps, guidance_scale=1.0)(params, prompts)

    def take_prompts(self, prompts, start, stop):
        noise, key, cond, null = prompts
        return noise[start:stop], key, {k: v[start:stop] for k, v in cond.items()}, null

    def prompt_labels(self, prompts):
        return prompts[2].get("class_labels") if self.class_conditional else None

    def write_samples(self, path_stem, teacher_samples, student_samples):
        path = f"{path_stem}.png"
        return path, save_grid(path, [np.asarray(teacher_samples), np.asarray(student_samples)])

    # -- generation (python -m fraqat_jax.generate) -----------------------------------------------

    #: ``{"labels"}`` on the class-conditional DiT; none on the text-to-image families, whose
    #: prompts need the pipeline's text encoders.
    generates: ClassVar[frozenset] = frozenset()

    def generate_images(self, model, cfg, *, labels=None, prompts=None, num_steps=None, guidance_scale=None,
                        seed: int = 0):
        """``uint8 [N, H, W, C]`` images of the class ``labels`` (pixel ``(x + 1) / 2 * 255``, clipped),
        sampled with the family's evaluation sampler from ``seed``'s noise, ``num_steps`` steps (default
        ``cfg.sample_steps``) and classifier-free guidance ``guidance_scale`` (default
        ``cfg.guidance_scale``) against the null class."""
        config = dict(model.config)
        num_classes = self.num_classes(config)
        if prompts:
            return self._images_from_prompts(model, cfg, list(prompts), num_steps, guidance_scale, seed)
        if num_classes is None:
            raise ConfigError(f"a {self.name} run cannot generate from --label: its teacher is not class-conditional")
        labels = [int(x) for x in (labels or [])]
        bad = [x for x in labels if not 0 <= x < num_classes]
        if not labels or bad:
            raise ConfigError(f"--label {bad or labels} is not allowed: give class labels in 0..{num_classes - 1}")
        shape = self.sample_shape(cfg, config)
        if shape[0] not in (1, 3):
            raise ConfigError(f"a {self.name} run with {shape[0]} latent channels needs a VAE to make images")
        steps = int(cfg.sample_steps if num_steps is None else num_steps)
        scale = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        if steps < 1 or not scale >= 0:
            raise ConfigError(f"--steps {steps} / --guidance {scale} not allowed: steps >= 1, guidance >= 0")
        graphdef, state = nnx.split(model)
        run = model_sampler(lambda st: nnx.merge(graphdef, st), self, num_steps=steps, guidance_scale=scale)
        noise, key = make_noise(int(seed), (len(labels), *shape))
        x = run(state, noise, {"class_labels": jnp.asarray(labels, jnp.int32)}, key,
                {"class_labels": jnp.int32(num_classes)})
        pixels = np.clip((np.asarray(x, np.float64) + 1.0) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
        return pixels.transpose(0, 2, 3, 1)


    def _images_from_prompts(self, model, cfg, prompts, num_steps, guidance_scale, seed):
        """Images of ``prompts`` through the teacher's whole pipeline (its text encoder in JAX, this
        family's sampler at the folder's flow shift with guidance against the null caption, its
        autoencoder), as ``eval --prompts`` samples them; a teacher that is no pipeline exits 2."""
        try:
            pipe = self.prompt_pipeline(cfg)
        except ValueError as e:  # PipelineError: the teacher has no text encoder or autoencoder
            raise ConfigError(f"a {self.name} run cannot generate from --prompt: {e}") from None
        steps = int(pipe.default_steps if num_steps is None else num_steps)
        scale = float(pipe.default_guidance if guidance_scale is None else guidance_scale)
        if steps < 1 or not scale >= 0:
            raise ConfigError(f"--steps {steps} / --guidance {scale} not allowed: steps >= 1, guidance >= 0")
        graphdef, state = nnx.split(model)
        run = pipe.sampler(lambda st: nnx.merge(graphdef, st), num_steps=steps, guidance_scale=scale)
        cond = {k: jnp.asarray(v) for k, v in pipe.encode(prompts).items()}
        null = {k: jnp.asarray(v) for k, v in pipe.null().items()}
        noise, key = make_noise(int(seed), (len(prompts), *pipe.latent_shape(dict(model.config))))
        images = np.clip(pipe.decode(run(state, noise, cond, key, null)), -1.0, 1.0)
        pixels = np.clip((images.astype(np.float64) + 1.0) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
        return pixels.transpose(0, 2, 3, 1)


class DiT(DiffusionFamily):
    """DiT (``DiTTransformer2DModel``): class-conditional, DDPM."""

    name = "dit"
    model_classes = ("DiTTransformer2DModel",)
    class_conditional = True
    pipeline_class = "DiTPipeline"
    generates = frozenset({"labels"})


class PixArt(DiffusionFamily):
    """PixArt-Sigma (``PixArtTransformer2DModel``): text-to-image, DDPM (DPM-Solver++ in diffusers,
    DDIM here with the same steps and guidance)."""

    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    text_tokens = 300
    pipeline_class = "PixArtSigmaPipeline"
    pipeline_defaults = {"sample_steps": 20, "guidance_scale": 4.5, "shift": 1.0}
    scheduler_shift = False


class _Flow(DiffusionFamily):
    objective = "flow"
    sampler = "euler"
    timesteps_per_sigma = 1000.0


class SD3(_Flow):
    """Stable Diffusion 3 (``SD3Transformer2DModel``): rectified flow, 77 CLIP + 256 T5 tokens, pooled."""

    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    text_tokens = 333
    pooled = True
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_defaults = {"sample_steps": 28, "guidance_scale": 7.0, "shift": 3.0}

    def text_width(self, model_config):
        return "joint_attention_dim", int(model_config["joint_attention_dim"])

    def default_text_width(self, model_config):
        return int(model_config.get("joint_attention_dim", 4096))

    def latent_channels(self, model_config):
        return int(model_config.get("in_channels", 16))


class Sana(_Flow):
    """Sana (``SanaTransformer2DModel``): rectified flow, a 32x deep-compression VAE, sampled as its
    pipeline samples it: flow DPM-Solver++ (2M), flow_shift 3.0."""

    name = "sana"
    model_classes = ("SanaTransformer2DModel",)
    sampler = "flow_dpm"
    generates = frozenset({"prompts"})
    text_tokens = 300
    vae_factor = 32
    vae_class = "AutoencoderDC"
    pipeline_class = "SanaPipeline"
    pipeline_defaults = {"sample_steps": 20, "guidance_scale": 4.5, "shift": 3.0}

    def default_text_width(self, model_config):
        return int(model_config.get("caption_channels", 2304))

    def pipeline_components(self, cfg, student):
        """The run's text-to-image phone pipeline when its teacher is a whole ``SanaPipeline`` folder
        (``fraqat_jax.diffusion.phone.pipeline_components``: text encoder, the student, DC-AE decoder,
        tokenizer, sampler, prompts)."""
        from fraqat_jax.diffusion.phone import pipeline_components

        return pipeline_components(self, cfg, student)


class Flux(_Flow):
    """FLUX.1 (``FluxTransformer2DModel``): rectified flow on 2x2-packed latents, sigma as its
    timestep (the model scales by 1000); dev pads prompts to 512 T5 tokens, schnell to 256."""

    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    timesteps_per_sigma = 1.0
    packed_2x2 = True
    pooled = True
    pipeline_class = "FluxPipeline"
    pipeline_defaults = {"sample_steps": 4, "guidance_scale": 1.0, "shift": 1.0}

    def text_length(self, model_config):
        return 512 if model_config.get("guidance_embeds") else 256

    def text_width(self, model_config):
        return "joint_attention_dim", int(model_config["joint_attention_dim"])

    def default_text_width(self, model_config):
        return int(model_config.get("joint_attention_dim", 4096))

    def latent_channels(self, model_config):
        return int(model_config.get("in_channels", 64)) // 4


DIT, PIXART, SD3, SANA, FLUX = DiT(), PixArt(), SD3(), Sana(), Flux()
#: The five families (what the ``fraqat_jax.families`` entry points name).
FAMILIES = (DIT, PIXART, SD3, SANA, FLUX)
