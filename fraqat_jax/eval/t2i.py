"""Text-to-image evaluation as the paper's Table 1: the student's images against the teacher's for
the same prompts and the same noise.

For each of ``num_samples`` samples ``i`` (prompt ``i mod P`` of a prompt cache, see
:func:`fraqat_jax.data.latents.read_prompts`; starting noise ``normal(fold_in(key(seed), i))``, so a
sample does not depend on the batch size or the mesh), the teacher and the student are sampled with
the family's evaluation sampler (its ``teacher_sampler``: DDIM for DDPM models, Euler for the
rectified-flow ones) and classifier-free guidance against the empty prompt's embeddings, as
the diffusers pipelines do. Both latents are decoded in JAX by the pipeline's VAE
(``vae.decode_latents``: ``z = latents / scaling_factor + shift_factor``). Defaults per family are
the diffusers pipelines' own (the family's ``pipeline_defaults``); the time shift of the flow samplers comes
from the scheduler config recorded in the prompt cache when it has one.

Metrics (images clipped to [-1, 1], float64 on the host):

- ``latent_mse``: mean squared difference of the sampled latents (diffusion space);
- ``mse``: mean squared difference of the decoded images, ``psnr``: the mean over images of
  ``10 log10(2^2 / mse_i)`` (peak-to-peak 2; images identical to the teacher's are left out, None
  when all are);
- ``fid`` (and ``fd``, the key the pixel-space evaluation uses): the Frechet distance between the
  Inception pool3 features of the student's and the teacher's images, as the paper measures FID
  (against the original model's samples), when Inception weights are given and ``num_samples >= 2``.

Outputs: ``images_dir/NNNNN_<prompt>.png`` (teacher above student, uint8 as diffusers'
``numpy_to_pil``), ``images_dir/captions.jsonl`` (one row per image: file, prompt and its own
metrics) and, when asked, ``images_dir/arrays.npz`` (the latents and decoded float images).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.data.latents import PromptCache
from fraqat_jax.data.streams import stream
from fraqat_jax.eval.fid import frechet_distance_from_features
from fraqat_jax.family import families, family_for_model
from fraqat_jax.models.convert import pipeline_component

__all__ = ["Sharding", "T2IEvaluator", "T2IInputError", "check_prompts", "check_vae_config",
           "latent_shape", "resolve_vae_dir", "settings_for"]



class T2IInputError(ValueError):
    """A prompt cache or VAE that does not fit the teacher; the message names both sides."""


@dataclass
class Sharding:
    """How the evaluation is laid out on a device mesh (built by the command line from ``--mesh``).

    ``batch(ndim)``: the sharding of a batch-leading array; ``params(state)``: shardings for an
    ``nnx.State``; ``batch_divisor``: the batch size must be a multiple of it (devices on the batch
    axes)."""

    batch: Callable[[int], Any]
    params: Callable[[Any], Any]
    batch_divisor: int = 1


# ------------------------------------------------------------------ input checks


def _is_t2i(family) -> bool:
    return getattr(family, "pipeline_defaults", None) is not None


def check_prompts(prompts: PromptCache, where: str, model_config, family, teacher_name: str) -> None:
    """Raises :class:`T2IInputError` when the prompt cache ``where`` cannot condition the teacher:
    another embedding or pooled width, or a missing field. ``family``: the teacher's family object."""
    if not _is_t2i(family):
        t2i = [f.name for f in families().values() if _is_t2i(f)]
        raise T2IInputError(f"--prompts {where}: the teacher {teacher_name} is a {family.name} model, not text-to-image "
                            f"(text-to-image families: {', '.join(t2i)})")
    source = prompts.info.get("pipeline", "its pipeline")
    emb = prompts.cond.get("encoder_hidden_states")
    key, want = family.text_width(model_config)
    if emb is None or emb.shape[-1] != want:
        got = "no encoder_hidden_states" if emb is None else f"encoder_hidden_states {emb.shape[-1]} wide"
        raise T2IInputError(f"--prompts {where} holds {got} (encoded by {source}) but the {family.name} teacher "
                            f"{teacher_name} takes {key}={want}; encode the prompts with the teacher's own pipeline")
    if family.pooled:
        pooled, want = prompts.cond.get("pooled_projections"), int(model_config["pooled_projection_dim"])
        if pooled is None or pooled.shape[-1] != want:
            got = "no pooled_projections" if pooled is None else f"pooled_projections {pooled.shape[-1]} wide"
            raise T2IInputError(f"--prompts {where} holds {got} (encoded by {source}) but the {family.name} teacher "
                                f"{teacher_name} takes pooled_projection_dim={want}; encode the prompts with the "
                                "teacher's own pipeline")


def resolve_vae_dir(path: str) -> str:
    """The folder with the VAE's ``config.json``: ``path`` or, for a pipeline folder, ``path/vae``
    (a missing config is reported by :func:`check_vae_config`, which names the teacher's needs)."""
    return str(pipeline_component(path, "vae"))


def check_vae_config(vae_dir: str, model_config, family, teacher_name: str) -> dict:
    """The VAE's diffusers config, after checking (before any weight is read) that it is the VAE
    class and latent channel count the teacher samples; :class:`T2IInputError` names both."""
    want_cls, want_c = family.vae_class, family.latent_channels(model_config)
    need = f"the {family.name} teacher {teacher_name} samples {want_c}-channel latents for an {want_cls}"
    path = os.path.join(vae_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise T2IInputError(f"--vae {vae_dir} has no readable config.json ({type(e).__name__}: {e}); {need}") from None
    cls = config.get("_class_name")
    if cls not in ("AutoencoderKL", "AutoencoderDC"):
        raise T2IInputError(f"--vae {vae_dir} holds a {cls!r} model, not a VAE (AutoencoderKL or AutoencoderDC); "
                            f"{need}: give the vae/ folder of the teacher's pipeline")
    got_c = int(config.get("latent_channels", 4))
    if cls != want_cls or got_c != want_c:
        raise T2IInputError(f"--vae {vae_dir} is an {cls} with {got_c} latent channels but {need}: give the vae/ folder "
                            "of the teacher's pipeline")
    return config


def latent_shape(family, model_config, data_latents_shape=None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the sampled latents: the run's training latents when known, else the
    teacher's ``sample_size`` (the pipelines' default resolution; Flux: 1024 px, 128 latents)."""
    c = family.latent_channels(model_config)
    if data_latents_shape is not None and int(data_latents_shape[0]) == c:
        return c, int(data_latents_shape[1]), int(data_latents_shape[2])
    size = int(model_config.get("sample_size") or 128)
    return c, size, size


def settings_for(family, info, *, sample_steps=None, guidance_scale=None, shift=None) -> dict[str, float]:
    """Steps, guidance and time shift: the given ones, else the pipeline's (the shift from the
    scheduler config the prompt cache recorded: ``shift``, or Sana's ``flow_shift``), else
    the family's ``pipeline_defaults``."""
    d = dict(family.pipeline_defaults)
    sched = dict((info or {}).get("scheduler") or {})
    if family.scheduler_shift and not sched.get("use_dynamic_shifting"):
        for key in ("shift", "flow_shift"):
            if sched.get(key) is not None:
                d["shift"] = float(sched[key])
                break
    for key, value in (("sample_steps", sample_steps), ("guidance_scale", guidance_scale), ("shift", shift)):
        if value is not None:
            d[key] = value
    return {"sample_steps": int(d["sample_steps"]), "guidance_scale": float(d["guidance_scale"]), "shift": float(d["shift"])}


# ------------------------------------------------------------------ the evaluator


def _slug(prompt: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "empty"


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """NCHW in [-1, 1] -> NHWC uint8, as diffusers' postprocess + numpy_to_pil."""
    return np.round(np.clip(images.transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def _host(x) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class T2IEvaluator:
    """Samples a teacher and its students on the prompts of a prompt cache and decodes them with ``vae``.

    ``latent_shape``: ``(C, H, W)`` of the samples; ``settings``: from :func:`settings_for`;
    ``batch_size``: samples per step (rounded up to ``sharding.batch_divisor``); ``inception``: a
    feature function ``images NCHW [-1, 1] -> (N, 2048)`` for FID, or None.
    """

    def __init__(self, teacher, vae, prompts: PromptCache, *, latent_shape: tuple[int, int, int],
                 settings: dict[str, float], num_samples: int | None = None, seed: int = 0, batch_size: int = 8,
                 inception: Callable | None = None, sharding: Sharding | None = None):
        self.family = family_for_model(teacher)
        self.prompts = prompts
        self.num_prompts = len(prompts.prompts)
        self.num_samples = int(num_samples or self.num_prompts)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.settings = dict(settings)
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.seed = int(seed)
        self.sharding = sharding
        div = sharding.batch_divisor if sharding else 1
        self.batch_size = -(-max(1, min(int(batch_size), self.num_samples)) // div) * div
        self.inception = inception
        self.teacher_graph, self.teacher_state = self._place(teacher)
        self.vae_graph, self.vae_state = self._place(vae)
        self.null = {k: jnp.asarray(v) for k, v in prompts.null.items()}
        out = None if sharding is None else sharding.batch(4)
        self._decode = jax.jit(lambda state, z: nnx.merge(self.vae_graph, state).decode_latents(z), out_shardings=out)
        base = jax.random.key(self.seed)
        shape = self.latent_shape
        self._noise = jax.jit(lambda idx: jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(idx),
                              out_shardings=out)
        self._key = jax.random.key(stream(self.seed, "eval_samples"))  # the sampler's own noise (unused by DDIM and Euler)

    def _place(self, module):
        graph, state = nnx.split(module)
        if self.sharding is not None:
            state = jax.device_put(state, self.sharding.params(state))
        return graph, state

    def _put(self, a: np.ndarray):
        if self.sharding is None:
            return jnp.asarray(a)
        return jax.make_array_from_callback(a.shape, self.sharding.batch(a.ndim), lambda index: a[index])

    def _sampler(self, graph):
        out = None if self.sharding is None else self.sharding.batch(4)
        return self.family.teacher_sampler(None, lambda state: nnx.merge(graph, state), out,
                                           num_steps=self.settings["sample_steps"],
                                           guidance_scale=self.settings["guidance_scale"], shift=self.settings["shift"])

    def _batches(self):
        """``(indices, valid)`` per step: sample indices padded to ``batch_size`` with the last one."""
        for start in range(0, self.num_samples, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            yield np.minimum(idx, self.num_samples - 1), idx < self.num_samples

    def evaluate(self, student, images_dir: str, *, save_arrays: bool = False, write: bool = True) -> dict[str, Any]:
        """Scores ``student``; writes the PNGs, ``captions.jsonl`` (and ``arrays.npz``) into
        ``images_dir`` when ``write``. Returns the metrics and settings (see the module docstring)."""
        teacher_sample = self._sampler(self.teacher_graph)
        student_graph, student_state = self._place(student)
        student_sample = self._sampler(student_graph)
        rows, feats, saved = [], ([], []), {k: [] for k in ("teacher_latents", "student_latents",
                                                             "teacher_images", "student_images")}
        if write:
            os.makedirs(images_dir, exist_ok=True)
        for idx, valid in self._batches():
            noise = self._noise(self._put(idx.astype(np.int32)))
            cond = {k: self._put(np.asarray(v[idx % self.num_prompts])) for k, v in self.prompts.cond.items()}
            prompts = (noise, self._key, cond, self.null)  # an image family's sampling prompts
            lat_t = teacher_sample(self.teacher_state, prompts)
            lat_s = student_sample(student_state, prompts)
            img_t, img_s = self._decode(self.vae_state, lat_t), self._decode(self.vae_state, lat_s)
            lat_t, lat_s, img_t, img_s = (_host(a)[valid].astype(np.float64) for a in (lat_t, lat_s, img_t, img_s))
            img_t, img_s = np.clip(img_t, -1.0, 1.0), np.clip(img_s, -1.0, 1.0)
            rows += self._score(idx[valid], lat_t, lat_s, img_t, img_s, images_dir if write else None)
            if self.inception is not None:
                feats[0].append(np.asarray(self.inception(img_t.astype(np.float32))))
                feats[1].append(np.asarray(self.inception(img_s.astype(np.float32))))
            if save_arrays:
                for k, a in zip(saved, (lat_t, lat_s, img_t, img_s), strict=True):
                    saved[k].append(a.astype(np.float32))
        if write:
            with open(os.path.join(images_dir, "captions.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            if save_arrays:
                np.savez(os.path.join(images_dir, "arrays.npz"), prompts=np.asarray([r["prompt"] for r in rows]),
                         **{k: np.concatenate(v) for k, v in saved.items()})
        return {**self._summary(rows, feats), **self.describe(), "images_dir": os.path.abspath(images_dir)}

    def _score(self, indices, lat_t, lat_s, img_t, img_s, images_dir: str | None) -> list[dict]:
        rows = []
        up_t, up_s = _to_uint8(img_t), _to_uint8(img_s)
        for j, i in enumerate(indices):
            prompt = self.prompts.prompts[int(i) % self.num_prompts]
            mse = float(np.mean(np.square(img_s[j] - img_t[j])))
            row = {"index": int(i), "file": f"{int(i):05d}_{_slug(prompt)}.png", "prompt": prompt,
                   "latent_mse": float(np.mean(np.square(lat_s[j] - lat_t[j]))), "mse": mse,
                   "psnr": 10 * math.log10(4.0 / mse) if mse > 0 else None}
            if images_dir is not None and jax.process_index() == 0:
                from PIL import Image

                Image.fromarray(np.concatenate([up_t[j], up_s[j]], axis=0)).save(os.path.join(images_dir, row["file"]))
            rows.append(row)
        return rows

    def _summary(self, rows: list[dict], feats) -> dict[str, Any]:
        psnr = [r["psnr"] for r in rows if r["psnr"] is not None]
        out: dict[str, Any] = {"latent_mse": float(np.mean([r["latent_mse"] for r in rows])),
                               "mse": float(np.mean([r["mse"] for r in rows])),
                               "psnr": float(np.mean(psnr)) if psnr else None, "fid": None, "fd": None}
        if self.inception is not None and len(rows) >= 2:
            out["fid"] = out["fd"] = frechet_distance_from_features(np.concatenate(feats[1]), np.concatenate(feats[0]))
        return out

    def describe(self) -> dict[str, Any]:
        return {"mode": "t2i", "family": self.family.name, "sampler": self.family.sampler, **self.settings,
                "num_samples": self.num_samples, "num_prompts": self.num_prompts, "batch_size": self.batch_size,
                "seed": self.seed, "latent_shape": list(self.latent_shape),
                "fd_features": "inception" if self.inception is not None else None}
