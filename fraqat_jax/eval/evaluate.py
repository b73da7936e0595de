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

from fraqat_jax.eval import samplers
from fraqat_jax.eval.fid import frechet_distance_from_features

VAL_KEY_OFFSET = 1_000_003  # the validation inputs' key: seed + this, never a training step's key


_COMPILED: list = []  # [(graphdef, family, {name: jitted fn})]: GraphDefs holding dict configs are unhashable


def _compiled(graphdef, family: str) -> dict:
    """Jitted ``outputs(state, x_t, t, cond)`` and ``sample(kind, steps, guidance)(state, ...)`` for a graph.

    One entry per model structure, so students of one teacher (any weights, any bit-width) share
    their compilations.
    """
    for g, f, fns in _COMPILED:
        if f == family and g == graphdef:
            return fns
    from fraqat_jax.train.models import apply_model

    scale = 1000.0 if family == "flux" else 1.0  # flux takes sigma, the samplers give 1000 * sigma

    @jax.jit
    def outputs(state, x_t, t, cond):
        return apply_model(nnx.merge(graphdef, state), family, x_t, t, cond).astype(jnp.float32)

    samplers_by_setting = {}

    def sampler(kind, num_steps, guidance):
        if (kind, num_steps, guidance) not in samplers_by_setting:

            @jax.jit
            def run(state, noise, cond, key, null_cond):
                model = nnx.merge(graphdef, state)
                fn = lambda x, t, c: apply_model(model, family, x, t / scale, c)  # noqa: E731
                kw = {"num_steps": num_steps}
                if guidance != 1.0:
                    kw.update(guidance_scale=guidance, null_cond=null_cond)
                return samplers.sample(kind, fn, noise, cond, key=key if kind != "euler" else None, **kw)

            samplers_by_setting[(kind, num_steps, guidance)] = run
        return samplers_by_setting[(kind, num_steps, guidance)]

    fns = {"outputs": outputs, "sampler": sampler}
    _COMPILED.append((graphdef, family, fns))
    return fns


def _outputs(graphdef, family, state, x_t, t, cond):
    return _compiled(graphdef, family)["outputs"](state, x_t, t, cond)


def _sample(graphdef, family, kind, num_steps, guidance, state, noise, cond, key, null_cond):
    return _compiled(graphdef, family)["sampler"](kind, num_steps, guidance)(state, noise, cond, key, null_cond)


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
        from fraqat_jax.train.models import family_of, objective_of

        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        self.cfg = cfg
        self.family = family_of(teacher)
        self.objective = objective_of(self.family)
        self.kind = "ddim" if self.objective == "ddpm" else "euler"
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
        noise, key = samplers.make_noise(seed, (self.num_samples, *self.sample_shape))
        self._noise, self._key = noise, key
        self._cond, self._null = self._sample_conditioning(seed)
        self.teacher_samples = self._draw(self.teacher_graph, self.teacher_state)
        self._features, self.fd_features = self._feature_fn(inception_weights)
        self._teacher_features = self._features(self.teacher_samples) if self._features else None
        self.teacher_accuracy = self._accuracy(self.teacher_samples)

    # ------------------------------------------------------------------ inputs

    def _source_rows(self, n: int, seed: int) -> dict:
        from fraqat_jax import data

        if self.cfg.data == "datafree":
            return {}
        src = data.make_source(self.cfg.data, seed=int(self.cfg.seed) + VAL_KEY_OFFSET + seed,
                               image_size=self.sample_shape[-1], data_dir=self.cfg.data_dir or None)
        return dict(src.batch(0, n))

    def _validation_inputs(self, seed: int):
        from fraqat_jax.train.step import diffusion_inputs

        rows = self._source_rows(self.num_val, seed)
        key = jax.random.key(int(self.cfg.seed) + VAL_KEY_OFFSET + seed)
        if not rows:  # data-free: clean inputs are the teacher's own samples from fresh noise
            k1, k2, k3 = jax.random.split(key, 3)
            noise = jax.random.normal(k1, (self.num_val, *self.sample_shape))
            labels = jax.random.randint(k2, (self.num_val,), 0, self.num_classes)
            cond = {"class_labels": labels}
            latents = _sample(self.teacher_graph, self.family, self.kind, self.sample_steps, 1.0,
                              self.teacher_state, noise, cond, k3, None)
            rows = {"latents": latents, **cond}
        latents = jnp.asarray(rows.pop("latents"))
        cond = {k: jnp.asarray(v) for k, v in rows.items()}
        x_t, t = diffusion_inputs(self.objective, self.family, jax.random.fold_in(key, 1), latents, self.cfg)
        return x_t, t, cond

    def _sample_conditioning(self, seed: int):
        n = self.num_samples
        if self.family == "dit":
            cond = {"class_labels": jnp.arange(n, dtype=jnp.int32) % self.num_classes}
            null = {"class_labels": jnp.int32(self.num_classes)}
            return cond, null
        rows = self._source_rows(n, seed + 1)
        rows.pop("latents", None)
        cond = {k: jnp.asarray(v) for k, v in rows.items()}
        null = jax.tree.map(lambda v: jnp.zeros_like(v[:1]), cond)
        return cond, null

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
        fn = functools.partial(_sample, graphdef, self.family, self.kind, self.sample_steps, self.guidance, state)
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
