"""Held-out inputs: what evaluation, the export's calibration and the trainer's sample grids feed a model.

Two kinds, each built in one place:

- :func:`heldout_inputs`: training-style inputs ``(x_t, t, cond)``: clean examples (the run's data,
  or for data-free runs the teacher's own samples from fresh noise) noised as training noises them,
  from a key that training never uses.
- :func:`sampling_inputs`: fixed starting noise, the sampler's key and the conditioning (with its
  unconditional counterpart for guidance), so a teacher and its students sample image for image
  from the same noise.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from fraqat_jax.diffusion.noise import diffusion_inputs
from fraqat_jax.diffusion.families import as_family

__all__ = ["heldout_inputs", "sampling_inputs", "teacher_examples"]


def teacher_examples(key, num: int, sample_shape: tuple[int, ...], num_classes: int, sample_clean: Callable) -> dict:
    """Data-free clean examples: ``{"latents": [num, *sample_shape], "class_labels": [num]}``, the
    teacher's samples (``sample_clean(noise, cond, key)``) from noise and labels drawn from
    ``split(key, 3)[:2]``, the sampler getting the third key. The trainer's data-free source and the
    data-free held-out inputs are both made this way."""
    k_noise, k_labels, k_sample = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, (num, *sample_shape), jnp.float32)
    cond = {"class_labels": jax.random.randint(k_labels, (num,), 0, num_classes)}
    return {"latents": sample_clean(noise, cond, k_sample), **cond}


def heldout_inputs(family, key, *, rows: Mapping[str, Any] | None = None,
                   sample_clean: Callable | None = None, num: int = 0, sample_shape: tuple[int, ...] = (),
                   num_classes: int | None = None, num_train_timesteps: int = 1000, logit_mean: float = 0.0,
                   logit_std: float = 1.0):
    """``(x_t, t, cond)`` for ``num`` held-out examples of ``family``.

    ``rows``: clean examples from the data (``latents`` [N, C, H, W] plus conditioning fields). When
    None (data-free), ``num`` class labels and clean latents are drawn: noise ``[num, *sample_shape]``
    and labels from ``split(key, 3)[:2]``, latents ``sample_clean(noise, {"class_labels": labels},
    split(key, 3)[2])`` (the teacher's sampler). Noise and timesteps then come from ``fold_in(key, 1)``
    exactly as :func:`~fraqat_jax.diffusion.noise.diffusion_inputs` draws them in training.
    """
    if rows is None:
        if sample_clean is None or not num_classes:
            raise ValueError("heldout_inputs without data rows needs sample_clean and num_classes (data-free)")
        rows = teacher_examples(key, num, sample_shape, num_classes, sample_clean)
    rows = dict(rows)
    latents = jnp.asarray(rows.pop("latents"))
    cond = {k: jnp.asarray(v) for k, v in rows.items()}
    x_t, t = diffusion_inputs(family, jax.random.fold_in(key, 1), latents, num_train_timesteps=num_train_timesteps,
                              logit_mean=logit_mean, logit_std=logit_std)
    return x_t, t, cond


def sampling_inputs(family, seed: int, num: int, sample_shape: tuple[int, ...], *,
                    num_classes: int | None = None, cond_rows: Mapping[str, Any] | None = None):
    """``(noise, key, cond, null_cond)`` for sampling ``num`` images from ``seed``.

    ``noise`` [num, *sample_shape] and the sampler's ``key`` are the two halves of
    ``split(key(seed))``. A class-conditional family (DiT): ``cond`` = labels ``0, 1, ..., num_classes - 1, 0, ...``
    and ``null_cond`` the null class ``num_classes``. Other families: the conditioning fields of
    ``cond_rows`` (e.g. text embeddings of the data) and a zero ``null_cond`` of one row.
    """
    k_init, k_steps = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(k_init, (num, *sample_shape), jnp.float32)
    if as_family(family).class_conditional:
        n_cls = num_classes or 1
        cond = {"class_labels": jnp.arange(num, dtype=jnp.int32) % n_cls}
        null = {"class_labels": jnp.int32(num_classes)} if num_classes else None
        return noise, k_steps, cond, null
    cond = {k: jnp.asarray(v) for k, v in dict(cond_rows or {}).items() if k != "latents"}
    null = jax.tree.map(lambda v: jnp.zeros_like(v[:1]), cond)
    return noise, k_steps, cond, null
