"""How faithful a student is to its teacher: validation loss, sample error, Frechet distance, accuracy.

:class:`Evaluator` is built once per teacher and config, and scores any number of students of that
teacher (the runs of ``compare``, or the checkpoints of one run) on the same inputs:

- ``val_loss(student)``: the training objective (mean squared error between student and teacher
  outputs, all output channels) on held-out inputs: ``num_val`` clean examples of the run's data
  with noise and timesteps drawn, as the trainer draws them, from a key the trainer never uses.
- ``sample_metrics(student)``: the student and the teacher sample from the *same* noise and
  conditioning (DDIM for DDPM families, Euler for rectified flow; ``sample_steps`` steps). Then

  - ``mse`` / ``psnr``: image-for-image error, ``psnr = 10 log10(2^2 / mse)`` (peak-to-peak 2, the
    [-1, 1] range of the data; None when the samples are identical);
  - ``fd``: the Frechet distance between features of the student's and the teacher's samples, as
    the paper measures FID (against the original model's samples, not real data). Features: the
    shipped digits classifier for 1x8x8 samples (``fd_features = "digits_classifier"``), Inception
    pool3 when ``inception_weights`` is given and samples have 1 or 3 channels (``"inception"``);
    otherwise no ``fd``;
  - ``accuracy``: for class-conditional digits, the share of student samples that the shipped
    classifier reads as the class they were asked for (``teacher_accuracy``: the same for the
    teacher).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import data
from fraqat_jax.data.streams import stream
from fraqat_jax.diffusion import (apply_model, family_of, heldout_inputs, model_sampler, objective_of,
                                  sampler_of, sampling_inputs)
from fraqat_jax.eval.fid import frechet_distance_from_features



_COMPILED: list = []  # [(graphdef, family, {name: jitted fn})]: GraphDefs holding dict configs are unhashable


def _compiled(graphdef, family: str) -> dict:
    """Jitted ``outputs(state, x_t, t, cond)`` and ``sampler(steps, guidance)(state, ...)`` for a graph.

    One entry per model structure, so students of one teacher (any weights, any bit-width) share
    their compilations.
    """
    for g, f, fns in _COMPILED:
        if f == family and g == graphdef:
            return fns

    @jax.jit
    def outputs(state, x_t, t, cond):
        return apply_model(nnx.merge(graphdef, state), family, x_t, t, cond).astype(jnp.float32)

    samplers_by_setting = {}

    def sampler(num_steps, guidance):
        if (num_steps, guidance) not in samplers_by_setting:
            samplers_by_setting[(num_steps, guidance)] = model_sampler(
                lambda state: nnx.merge(graphdef, state), family, num_steps=num_steps, guidance_scale=guidance)
        return samplers_by_setting[(num_steps, guidance)]

    fns = {"outputs": outputs, "sampler": sampler}
    _COMPILED.append((graphdef, family, fns))
    return fns


def _outputs(graphdef, family, state, x_t, t, cond):
    return _compiled(graphdef, family)["outputs"](state, x_t, t, cond)


def _sample(graphdef, family, num_steps, guidance, state, noise, cond, key, null_cond):
    return _compiled(graphdef, family)["sampler"](num_steps, guidance)(state, noise, cond, key, null_cond)


def _batched(fn, n: int, batch_size: int, *arrays):
    """Runs ``fn`` over the leading axis of pytrees ``arrays`` in chunks; concatenates numpy outputs."""
    outs = []
    for i in range(0, n, batch_size):
        chunk = jax.tree.map(lambda a: a[i : i + batch_size], arrays)
        outs.append(np.asarray(fn(*chunk)))
    return np.concatenate(outs)


class Evaluator:
    """Scores students of ``teacher`` trained with config ``cfg`` (see the module docstring).

    ``num_samples`` samples (seeded by ``seed``) with ``sample_steps`` sampler steps; ``num_val``
    validation inputs; ``guidance_scale`` for class/text-conditional sampling (1: none).
    """

    def __init__(
        self,
        teacher,
        cfg,
        *,
        num_samples: int = 500,
        sample_steps: int | None = None,
        num_val: int = 512,
        seed: int = 0,
        guidance_scale: float = 1.0,
        inception_weights: str | None = None,
        batch_size: int = 500,
    ):
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        self.cfg = cfg
        self.family = family_of(teacher)
        self.objective = objective_of(self.family)
        self.kind = sampler_of(self.family)
        self.sample_steps = int(sample_steps or cfg.sample_steps)
        self.num_samples = int(num_samples)
        self.num_val = int(num_val)
        self.guidance = float(guidance_scale)
        self.batch_size = int(batch_size)
        self.teacher_graph, self.teacher_state = nnx.split(teacher)
        config = teacher.config
        self.num_classes = int(config["num_embeds_ada_norm"]) if self.family == "dit" else None
        channels = int(config.get("in_channels", 4))
        size = int(cfg.image_size or config.get("sample_size", 8))
        self.sample_shape = (channels, size, size)

        self._val = self._validation_inputs(seed)
        self.val_target = _batched(
            functools.partial(_outputs, self.teacher_graph, self.family, self.teacher_state),
            self.num_val, self.batch_size, *self._val,
        )
        rows = None if self.family == "dit" else self._source_rows(self.num_samples, stream(seed, "eval_samples"))
        self._noise, self._key, self._cond, self._null = sampling_inputs(
            self.family, seed, self.num_samples, self.sample_shape, num_classes=self.num_classes, cond_rows=rows)
        self.teacher_samples = self._draw(self.teacher_graph, self.teacher_state)
        self._features, self.fd_features = self._feature_fn(inception_weights)
        self._teacher_features = self._features(self.teacher_samples) if self._features else None
        self.teacher_accuracy = self._accuracy(self.teacher_samples)

    # ------------------------------------------------------------------ inputs

    def _source_rows(self, n: int, seed: int) -> dict | None:
        if self.cfg.data == "datafree":
            return None
        src = data.make_source(self.cfg.data, seed=stream(int(self.cfg.seed) + seed, "validation"),
                               image_size=self.sample_shape[-1], data_dir=self.cfg.data_dir or None)
        return dict(src.batch(0, n))

    def _validation_inputs(self, seed: int):
        def teacher_samples(noise, cond, key):
            return _sample(self.teacher_graph, self.family, self.sample_steps, 1.0, self.teacher_state, noise, cond,
                           key, None)

        return heldout_inputs(self.family, jax.random.key(stream(int(self.cfg.seed) + seed, "validation")),
                              rows=self._source_rows(self.num_val, seed), sample_clean=teacher_samples,
                              num=self.num_val, sample_shape=self.sample_shape, num_classes=self.num_classes,
                              num_train_timesteps=int(self.cfg.num_train_timesteps),
                              logit_mean=float(self.cfg.logit_mean), logit_std=float(self.cfg.logit_std))

    def _feature_fn(self, inception_weights):
        if self.sample_shape == (1, 8, 8):
            from fraqat_jax.eval.classifier import DigitsClassifier

            self.classifier = DigitsClassifier.load()
            return (lambda x: self.classifier.features(np.clip(x, -1, 1))), "digits_classifier"
        self.classifier = None
        if inception_weights and self.sample_shape[0] in (1, 3):
            from fraqat_jax.eval.inception import inception_feature_fn, load_inception

            fn = inception_feature_fn(load_inception(inception_weights))
            return (lambda x: fn(np.clip(x, -1, 1))), "inception"
        return None, None

    def _accuracy(self, images) -> float | None:
        if self.classifier is None or self.num_classes != 10:
            return None
        return self.classifier.accuracy(np.clip(images, -1, 1), np.asarray(self._cond["class_labels"]))

    def _draw(self, graphdef, state) -> np.ndarray:
        fn = functools.partial(_sample, graphdef, self.family, self.sample_steps, self.guidance, state)
        return _batched(lambda noise, cond: fn(noise, cond, self._key, self._null), self.num_samples,
                        self.batch_size, self._noise, self._cond)

    # ------------------------------------------------------------------ scores

    def val_loss(self, student) -> float:
        """Teacher-student mean squared error on the held-out inputs (all output channels)."""
        graphdef, state = nnx.split(student)
        out = _batched(functools.partial(_outputs, graphdef, self.family, state), self.num_val, self.batch_size,
                       *self._val)
        return float(np.mean(np.square(out.astype(np.float64) - self.val_target)))

    def student_samples(self, student) -> np.ndarray:
        graphdef, state = nnx.split(student)
        return self._draw(graphdef, state)

    def sample_metrics(self, student, samples: np.ndarray | None = None) -> dict[str, Any]:
        """``mse``, ``psnr``, ``fd`` and ``accuracy`` of the student's samples (see the module doc)."""
        s = self.student_samples(student) if samples is None else samples
        mse = float(np.mean(np.square(s.astype(np.float64) - self.teacher_samples)))
        out: dict[str, Any] = {"mse": mse, "psnr": 10 * math.log10(4.0 / mse) if mse > 0 else None}
        if self._features is not None:
            out["fd"] = frechet_distance_from_features(self._features(s), self._teacher_features)
        acc = self._accuracy(s)
        if acc is not None:
            out["accuracy"] = acc
        return out

    def evaluate(self, student) -> dict[str, Any]:
        """``val_loss`` and the sample metrics in one dict."""
        return {"val_loss": self.val_loss(student), **self.sample_metrics(student)}

    def settings(self) -> dict[str, Any]:
        return {
            "sampler": self.kind,
            "sample_steps": self.sample_steps,
            "num_samples": self.num_samples,
            "num_val": self.num_val,
            "guidance_scale": self.guidance,
            "fd_features": self.fd_features,
            "teacher_accuracy": self.teacher_accuracy,
        }
