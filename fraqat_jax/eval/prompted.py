"""Text-to-image evaluation from prompts: a run whose teacher is a whole prompt-to-image pipeline
(text encoder, transformer, autoencoder; e.g. ``builtin:sana``) sampled on a file of prompts that
each name a digit.

``python -m fraqat_jax.eval --workdir RUN --prompts FILE`` reads ``FILE`` (UTF-8, one prompt per
line, blank lines skipped), finds the digit each prompt names (its word ``zero`` .. ``nine`` or its
numeral ``0`` .. ``9``), encodes the prompts with the run's own text encoder in JAX (the family's
``prompt_pipeline``), samples the teacher, the student as trained (fake quant) and its frozen integer
form from the same noise (sample ``i``: prompt ``i mod P``, starting noise
``normal(fold_in(key(seed), i))``) with the pipeline's sampler and classifier-free guidance against
the null caption, and decodes every sample with the run's own autoencoder.

Scores per model (``teacher``, ``student``, ``student_frozen``), images clipped to [-1, 1]:

- ``accuracy``: the shipped digits classifier on the images averaged over boxes down to 8x8, against
  the digit the prompt names;
- ``fd``: the Frechet distance between the classifier's features of the model's images and of the
  shipped real digits (the same reference for every model); the students also get
  ``fd_vs_teacher`` (against the teacher's images, as the paper measures FID);
- ``psnr`` (students): the mean over images of ``10 log10(2^2 / mse_i)`` against the teacher's image
  of the same prompt and noise (images equal to the teacher's left out; None when all are), and
  ``mse``.

Writes ``STEM.png`` (the family's sample grid: one column per sample, the teacher above the
student) and ``STEM.jsonl`` (per sample: prompt, digit and each model's predicted digit).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from fraqat_jax.eval.fid import frechet_distance_from_features

__all__ = ["MODELS", "PromptsError", "box_average", "evaluate_prompted", "prompt_digits", "read_prompt_file"]

MODELS = ("teacher", "student", "student_frozen")


class PromptsError(ValueError):
    """A prompt file that cannot be evaluated (the message names the file, the line and what is allowed)."""


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of the UTF-8 text file ``path``, stripped; :class:`PromptsError` when it is
    not a readable file, not UTF-8, or holds no prompt."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PromptsError(f"--prompts {path!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"--prompts {path!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                           "give a UTF-8 file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"--prompts {path!r} is empty; give a UTF-8 file with one prompt per line")
    return prompts


def prompt_digits(prompts: list[str], where: str) -> np.ndarray:
    """The digit each prompt names (int32 ``[P]``); :class:`PromptsError` naming the first prompt that
    names none."""
    from fraqat_jax.data.captions import DIGIT_WORDS, prompt_digit

    digits = []
    for i, prompt in enumerate(prompts):
        digit = prompt_digit(prompt)
        if digit is None:
            raise PromptsError(f"--prompts {where}: prompt {i + 1} {prompt!r} names no digit; name one by its word "
                               f"({', '.join(DIGIT_WORDS)}) or its numeral (0 to 9)")
        digits.append(digit)
    return np.asarray(digits, np.int32)


def box_average(images: np.ndarray, size: int = 8) -> np.ndarray:
    """Images ``[B, C, S, S]`` (``S`` a multiple of ``size``) -> ``[B, 1, size, size]``: the mean over
    channels and over each ``S/size`` x ``S/size`` box."""
    b, _, h, w = images.shape
    if h % size or w % size:
        raise ValueError(f"images of {h}x{w} pixels cannot be averaged over boxes down to {size}x{size}")
    gray = np.asarray(images, np.float64).mean(axis=1)
    return gray.reshape(b, size, h // size, size, w // size).mean(axis=(2, 4))[:, None].astype(np.float32)


def _frozen(student, cfg):
    from fraqat_jax.nn import freeze
    from fraqat_jax.runs import unscanned

    return freeze(unscanned(student, cfg))


def _psnr(images: np.ndarray, reference: np.ndarray) -> tuple[float, float | None]:
    per_image = np.square(images.astype(np.float64) - reference).reshape(len(images), -1).mean(axis=1)
    psnr = [10 * math.log10(4.0 / m) for m in per_image if m > 0]
    return float(per_image.mean()), (float(np.mean(psnr)) if psnr else None)


def evaluate_prompted(teacher, student, cfg, pipeline, prompts: list[str], digits: np.ndarray, *, num_samples=None,
                      num_steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 8,
                      stem: str, save_arrays: bool = False) -> dict[str, Any]:
    """Samples and scores the three models (see the module docstring); ``pipeline`` is the family's
    ``prompt_pipeline`` of the run. Writes ``stem + ".png"`` and ``stem + ".jsonl"`` and, with
    ``save_arrays``, ``stem + ".npz"`` (``noise``, ``digits`` and each model's ``<name>_images``)."""
    from fraqat_jax.data.sources import digits as real_digits
    from fraqat_jax.eval.classifier import DigitsClassifier
    from fraqat_jax.family import family_for_model

    n = int(num_samples or len(prompts))
    which = np.arange(n) % len(prompts)
    cond = pipeline.encode(prompts)
    null = {k: jax.numpy.asarray(v) for k, v in pipeline.null().items()}
    shape = pipeline.latent_shape(teacher.config)
    base = jax.random.key(seed)
    noise_of = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape)))
    key = jax.random.key(0)  # the sampler draws no noise of its own
    bs = max(1, min(int(batch_size), n))
    models = {"teacher": teacher, "student": student, "student_frozen": _frozen(student, cfg)}
    images = {}
    for name, model in models.items():
        graph, state = nnx.split(model)
        run = pipeline.sampler(lambda st, g=graph: nnx.merge(g, st), num_steps=num_steps, guidance_scale=guidance_scale)
        out = []
        for start in range(0, n, bs):
            idx = np.minimum(np.arange(start, start + bs), n - 1)  # the last batch padded: one compilation
            batch = {k: jax.numpy.asarray(v[which[idx]]) for k, v in cond.items()}
            latents = run(state, noise_of(jax.numpy.asarray(idx, np.int32)), batch, key, null)
            out.append(np.clip(pipeline.decode(latents), -1.0, 1.0)[: min(bs, n - start)])
        images[name] = np.concatenate(out)

    classifier = DigitsClassifier.load()
    reference = classifier.features(real_digits().arrays["latents"])
    small = {name: box_average(x) for name, x in images.items()}
    feats = {name: classifier.features(x) for name, x in small.items()}
    preds = {name: classifier.predict(x) for name, x in small.items()}
    want = digits[which]
    result: dict[str, Any] = {}
    for name in MODELS:
        row: dict[str, Any] = {"accuracy": float(np.mean(preds[name] == want)),
                               "fd": frechet_distance_from_features(feats[name], reference)}
        if name != "teacher":
            row["fd_vs_teacher"] = frechet_distance_from_features(feats[name], feats["teacher"])
            row["mse"], row["psnr"] = _psnr(images[name], images["teacher"])
        result[name] = row

    if save_arrays:
        noise = np.concatenate([np.asarray(noise_of(jax.numpy.arange(i, min(i + bs, n), dtype=np.int32)))
                                for i in range(0, n, bs)])
        np.savez(stem + ".npz", noise=noise, digits=want, **{f"{name}_images": x for name, x in images.items()})
    grid, _ = family_for_model(teacher).write_samples(stem, images["teacher"], images["student"])
    with open(stem + ".jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"index": i, "prompt": prompts[which[i]], "digit": int(want[i]),
                                **{name: int(preds[name][i]) for name in MODELS}}) + "\n")
    return {"mode": "prompts", **result, "num_samples": n, "num_prompts": len(prompts), "sample_steps": int(num_steps),
            "guidance_scale": float(guidance_scale), "seed": int(seed), "latent_shape": list(shape),
            "image_shape": list(images["teacher"].shape[1:]), "fd_reference": "digits",
            "fd_features": "digits_classifier", **pipeline.settings(), "grid": os.path.abspath(grid),
            "predictions": os.path.abspath(stem + ".jsonl")}
