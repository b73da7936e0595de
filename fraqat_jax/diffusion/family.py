"""The five diffusion families behind the :class:`fraqat_jax.family.Family` interface.

One :class:`DiffusionFamily` per family (``dit``, ``pixart``, ``sd3``, ``sana``, ``flux``), all
registered when ``fraqat_jax.diffusion`` is imported. Training inputs are DDPM noise and uniform
timesteps (DiT, PixArt) or rectified-flow interpolants with logit-normal sigma (SD3, Sana, Flux);
the loss is the mean squared error over every output channel; samples are PNG grids, teacher above
student, from the same noise.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import data
from fraqat_jax.data.streams import stream
from fraqat_jax.diffusion import teachers
from fraqat_jax.diffusion.families import FAMILIES, apply_model
from fraqat_jax.diffusion.grids import save_grid
from fraqat_jax.diffusion.heldout import heldout_inputs, sampling_inputs, teacher_examples
from fraqat_jax.diffusion.noise import diffusion_inputs
from fraqat_jax.diffusion.samplers import make_noise, model_sampler
from fraqat_jax.family import ConfigError, Family, register

__all__ = ["CONFIG_KEYS", "DiffusionFamily", "TEXT_TOKENS", "batch_fields"]

#: The diffusion families' own config keys: ``{key: (default, help)}``.
CONFIG_KEYS: dict[str, tuple[Any, str]] = {
    "image_size": (0, "resize TFDS images to this size (0: the teacher's sample_size)"),
    "num_train_timesteps": (1000, "DDPM training timesteps (DiT, PixArt)"),
    "logit_mean": (0.0, "rectified flow: mean of the logit-normal timestep density"),
    "logit_std": (1.0, "rectified flow: std of the logit-normal timestep density"),
    "sample_steps": (20, "sampler steps for the PNG grids and the data-free source"),
    "guidance_scale": (1.0, "classifier-free guidance for the PNG grids (1: none)"),
}
DATA_FORMS = "digits, datafree, tfds:NAME[:SPLIT] or latents:DIR"

#: Text lengths of the diffusers pipelines' defaults (cached text embeddings per example).
TEXT_TOKENS = {"sd3": 333, "pixart": 300, "sana": 300, "flux_dev": 512, "flux_schnell": 256}


def batch_fields(family: str, model_config, *, latent_size: int) -> dict:
    """Per-example batch fields ``{name: (shape, dtype name)}`` a data source yields for ``family``.

    ``latent_size``: latent height = width. Text-to-image families read cached text embeddings
    (``fraqat_jax.data.latents``): ``encoder_hidden_states [L, D]`` and, for SD3 and Flux,
    ``pooled_projections [D']``; the class-conditional DiT reads ``class_labels``.
    """
    c = model_config
    s = int(latent_size)
    if family == "dit":
        return {"latents": ((int(c.get("in_channels", 4)), s, s), "float32"), "class_labels": ((), "int32")}
    if family == "flux":
        channels = int(c.get("in_channels", 64)) // 4  # 2x2 packing: 64 packed = 16 latent channels
        length = TEXT_TOKENS["flux_dev" if c.get("guidance_embeds") else "flux_schnell"]
        width = int(c.get("joint_attention_dim", 4096))
    elif family == "sd3":
        channels, length, width = int(c.get("in_channels", 16)), TEXT_TOKENS["sd3"], int(c.get("joint_attention_dim", 4096))
    else:  # pixart, sana
        channels, length = int(c.get("in_channels", 4)), TEXT_TOKENS[family]
        width = int(c.get("caption_channels", 4096 if family == "pixart" else 2304))
    spec = {"latents": ((channels, s, s), "float32"), "encoder_hidden_states": ((length, width), "float32")}
    if family in ("sd3", "flux"):
        spec["pooled_projections"] = ((int(c.get("pooled_projection_dim", 2048)),), "float32")
    return spec


class _Sampler:
    """``sample(params, (noise, key, cond, null_cond)) -> images [B, C, H, W]`` over a jitted sampler."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, params, prompts):
        noise, key, cond, null = prompts
        return self.jitted(params, noise, cond, key, null)


class DiffusionFamily(Family):
    """A diffusion family: ``name`` one of ``dit | pixart | sd3 | sana | flux``."""

    def __init__(self, name: str, model_class: str):
        self.name = name
        self.model_classes = (model_class,)

    # -- configuration ---------------------------------------------------------------------------

    def config_keys(self):
        return CONFIG_KEYS

    def validate_config(self, cfg) -> None:
        for key in ("num_train_timesteps", "sample_steps"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
                raise ConfigError(f"{key}={cfg[key]!r} is not allowed: use a positive integer")
        spec = cfg.data
        if not (spec in ("digits", "datafree") or spec.startswith("tfds:") or spec.startswith("latents:")):
            raise ConfigError(f"data={spec!r} is not allowed: use {DATA_FORMS}")
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

    # -- data and inputs ---------------------------------------------------------------------------

    def sample_shape(self, cfg, teacher_config) -> tuple[int, int, int]:
        """``(C, H, W)`` of one clean example: the teacher's channels, ``image_size`` or its sample size."""
        size = int(cfg.image_size or teacher_config.get("sample_size", 8))
        return int(teacher_config.get("in_channels", 4)), size, size

    def num_classes(self, teacher_config) -> int | None:
        """The class count of a class-conditional DiT (its null class is this number), else None."""
        n = teacher_config.get("num_embeds_ada_norm")
        return int(n) if n and self.name == "dit" else None

    def make_source(self, cfg, teacher_config, sample_teacher=None, *, seed: int | None = None):
        shape = self.sample_shape(cfg, teacher_config)
        if cfg.data != "datafree":
            source = data.make_source(cfg.data, seed=cfg.seed if seed is None else seed, image_size=shape[1],
                                      data_dir=cfg.data_dir or None)
            # before anything compiles: a size or channel count the teacher cannot take, named here
            data.check_fits_teacher(cfg.data, source.element_spec, teacher_config, family=self.name)
            return source
        if self.name != "dit":
            raise ConfigError(f"data=datafree needs a class-conditional DiT teacher, got a {self.name} teacher "
                              "(text-to-image teachers need cached text embeddings: data=latents:DIR)")
        num_classes = self.num_classes(teacher_config)

        def generate(key, n):
            return teacher_examples(key, n, shape, num_classes, lambda noise, cond, k: sample_teacher((noise, k, cond, None)))

        spec = {"latents": (shape, np.dtype(np.float32)), "class_labels": ((), np.dtype(np.int32))}
        return data.DataFreeSource(generate, spec, seed=stream(cfg.seed, "datafree") if seed is None else seed)

    def training_inputs(self, key, batch, cfg):
        latents = batch["latents"]
        cond = {k: v for k, v in batch.items() if k != "latents"}
        x_t, t = diffusion_inputs(self.name, key, latents, num_train_timesteps=int(cfg.num_train_timesteps),
                                  logit_mean=float(cfg.logit_mean), logit_std=float(cfg.logit_std))
        return x_t, t, cond

    def apply(self, model, inputs):
        return apply_model(model, self.name, *inputs)

    def loss(self, student_out, teacher_out, inputs):
        return jnp.mean(jnp.square(student_out.astype(jnp.float32) - teacher_out.astype(jnp.float32)))

    def heldout_inputs(self, cfg, teacher_config, rows, key, num, sample_teacher=None):
        sample_clean = None
        if sample_teacher is not None:
            sample_clean = lambda noise, cond, k: sample_teacher((noise, k, cond, None))  # noqa: E731
        n_cls = teacher_config.get("num_embeds_ada_norm")
        return heldout_inputs(self.name, key, rows=rows, sample_clean=sample_clean, num=num,
                              sample_shape=self.sample_shape(cfg, teacher_config),
                              num_classes=int(n_cls) if n_cls else None,
                              num_train_timesteps=int(cfg.num_train_timesteps), logit_mean=float(cfg.logit_mean),
                              logit_std=float(cfg.logit_std))

    def example_batch(self, model_config, *, latent_size: int) -> dict:
        return batch_fields(self.name, model_config, latent_size=latent_size)

    def example_size(self, cfg, model_config) -> dict:
        return {"latent_size": self.sample_shape(cfg, model_config)[1]}

    # -- samples -----------------------------------------------------------------------------------

    def teacher_sampler(self, cfg, build, out_shardings=None, *, guidance_scale: float | None = None):
        scale = float(cfg.guidance_scale) if guidance_scale is None else float(guidance_scale)
        return _Sampler(model_sampler(build, self.name, num_steps=int(cfg.sample_steps), guidance_scale=scale,
                                      out_shardings=out_shardings))

    def sample_prompts(self, cfg, teacher_config, source, num):
        rows = None if self.name == "dit" else source.batch(0, num)
        return sampling_inputs(self.name, stream(cfg.seed, "sample_grid"), num, self.sample_shape(cfg, teacher_config),
                               num_classes=self.num_classes(teacher_config), cond_rows=rows)

    def write_samples(self, path_stem, teacher_samples, student_samples):
        path = f"{path_stem}.png"
        return path, save_grid(path, [np.asarray(teacher_samples), np.asarray(student_samples)])

    # -- generation (python -m fraqat_jax.generate) -----------------------------------------------

    @property
    def generates(self) -> frozenset:
        """``{"labels"}`` for the class-conditional DiT; none for the text-to-image families, whose
        prompts need the pipeline's text encoders."""
        return frozenset({"labels"}) if self.name == "dit" else frozenset()

    def generate_images(self, model, cfg, *, labels=None, prompts=None, num_steps=None, guidance_scale=None,
                        seed: int = 0):
        """``uint8 [N, H, W, C]`` images of the class ``labels`` (pixel ``(x + 1) / 2 * 255``, clipped),
        sampled with the family's evaluation sampler from ``seed``'s noise, ``num_steps`` steps (default
        ``cfg.sample_steps``) and classifier-free guidance ``guidance_scale`` (default
        ``cfg.guidance_scale``) against the null class."""
        config = dict(model.config)
        num_classes = self.num_classes(config)
        if prompts:
            raise ConfigError(f"a {self.name} run cannot generate from --prompt here: text prompts need the "
                              "pipeline's text encoders; use --label on a class-conditional DiT run")
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
        run = model_sampler(lambda st: nnx.merge(graphdef, st), self.name, num_steps=steps, guidance_scale=scale)
        noise, key = make_noise(int(seed), (len(labels), *shape))
        x = run(state, noise, {"class_labels": jnp.asarray(labels, jnp.int32)}, key,
                {"class_labels": jnp.int32(num_classes)})
        pixels = np.clip((np.asarray(x, np.float64) + 1.0) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
        return pixels.transpose(0, 2, 3, 1)


for _class, _name in FAMILIES.items():
    register(DiffusionFamily(_name, _class))
