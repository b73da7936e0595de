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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.data.streams import stream
from fraqat_jax.eval.fid import frechet_distance_from_features
from fraqat_jax.family import family_for_model

_COMPILED: list = []  # [(graphdef, family, {name: fn})]: GraphDefs holding dict configs are unhashable


def _compiled(graphdef, family, cfg) -> dict:
    """Jitted ``outputs(state, inputs)`` and ``sampler(steps, guidance)`` for a graph (the family's
    ``apply`` and ``teacher_sampler``). One entry per model structure, so students of one teacher (any
    weights, any bit-width) share their compilations."""
    for g, f, fns in _COMPILED:
        if f is family and g == graphdef:
            return fns

    @jax.jit
    def outputs(state, inputs):
        return family.apply(nnx.merge(graphdef, state), inputs).astype(jnp.float32)

    samplers_by_setting = {}

    def sampler(num_steps, guidance):
        if (num_steps, guidance) not in samplers_by_setting:
            samplers_by_setting[(num_steps, guidance)] = family.teacher_sampler(
                cfg, lambda state: nnx.merge(graphdef, state), num_steps=num_steps, guidance_scale=guidance)
        return samplers_by_setting[(num_steps, guidance)]

    fns = {"outputs": outputs, "sampler": sampler}
    _COMPILED.append((graphdef, family, fns))
    return fns


def _batched(fn, n: int, batch_size: int, tree):
    """Runs ``fn`` over the leading axis of pytree ``tree`` in chunks; concatenates numpy outputs."""
    outs = []
    for i in range(0, n, batch_size):
        outs.append(np.asarray(fn(jax.tree.map(lambda a: a[i : i + batch_size], tree))))
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
        self.family = family_for_model(teacher)
        config = dict(teacher.config)
        settings = self.family.eval_settings(cfg, config)
        self.kind = settings.get("sampler")
        self.objective = settings.get("objective")
        self.sample_shape = tuple(settings.get("sample_shape") or ())
        self.num_classes = settings.get("num_classes")
        self.sample_steps = int(sample_steps or cfg.get("sample_steps", 0) or 0) or None
        self.num_samples = int(num_samples)
        self.num_val = int(num_val)
        self.guidance = float(guidance_scale)
        self.batch_size = int(batch_size)
        self.teacher_graph, self.teacher_state = nnx.split(teacher)
        self._config = config
        self.sampling = self.family.can_sample

        self._val = self._validation_inputs(seed)
        self.val_target = _batched(self._outputs_fn(self.teacher_graph, self.teacher_state), self.num_val,
                                   self.batch_size, self._val)
        self.teacher_samples = self._features = self._teacher_features = None
        self.fd_features = self.teacher_accuracy = self.classifier = None
        if self.sampling:
            source = self._source(stream(seed, "eval_samples"))
            self._prompts = self.family.sample_prompts(cfg, config, source, self.num_samples, seed=seed)
            self.teacher_samples = self._draw(self.teacher_graph, self.teacher_state)
            self._features, self.fd_features = self._feature_fn(inception_weights)
            self._teacher_features = self._features(self.teacher_samples) if self._features else None
            self.teacher_accuracy = self._accuracy(self.teacher_samples)

    # ------------------------------------------------------------------ inputs

    def _outputs_fn(self, graphdef, state):
        fn = _compiled(graphdef, self.family, self.cfg)["outputs"]
        return lambda inputs: fn(state, inputs)

    def _sample_fn(self, graphdef, guidance):
        return _compiled(graphdef, self.family, self.cfg)["sampler"](self.sample_steps, guidance)

    def _source(self, seed: int):
        """The run's data source (seeded apart from training), None for data made by the teacher."""
        if self.cfg.data == "datafree":
            return None
        return self.family.make_source(self.cfg, self._config, seed=stream(int(self.cfg.seed) + seed, "validation"))

    def _validation_inputs(self, seed: int):
        source = self._source(seed)
        rows = None if source is None else dict(source.batch(0, self.num_val))
        sample_teacher = None
        if self.sampling:
            sample = self._sample_fn(self.teacher_graph, 1.0)
            sample_teacher = lambda prompts: sample(self.teacher_state, prompts)  # noqa: E731
        return self.family.heldout_inputs(self.cfg, self._config, rows,
                                          jax.random.key(stream(int(self.cfg.seed) + seed, "validation")),
                                          self.num_val, sample_teacher)

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
        labels = self.family.prompt_labels(self._prompts)
        return None if labels is None else self.classifier.accuracy(np.clip(images, -1, 1), np.asarray(labels))

    def _draw(self, graphdef, state) -> np.ndarray:
        fn = self._sample_fn(graphdef, self.guidance)
        outs = [np.asarray(fn(state, self.family.take_prompts(self._prompts, i, i + self.batch_size)))
                for i in range(0, self.num_samples, self.batch_size)]
        return np.concatenate(outs)

    # ------------------------------------------------------------------ scores

    def val_loss(self, student) -> float:
        """Teacher-student mean squared error on the held-out inputs (all output channels)."""
        graphdef, state = nnx.split(student)
        out = _batched(self._outputs_fn(graphdef, state), self.num_val, self.batch_size, self._val)
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
        """``val_loss`` and, for a family that samples, the sample metrics in one dict."""
        out = {"val_loss": self.val_loss(student)}
        return {**out, **self.sample_metrics(student)} if self.sampling else out

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
