"""generate/: "generate with this run", for every family: ``python -m fraqat_jax.generate``.

A run's workdir (or an orbax export, ``python -m fraqat_jax.export``) gives the model; its family
object generates: text families continue prompts (``family.generate_text``: the one key-value-cache
decoder, the run's tokenizer, end tokens and chat template), class-conditional diffusion families
draw images of class labels (``family.generate_images``). This package names no family.

- :func:`load_model`: ``(model, cfg, family)`` of a workdir and ``model`` in :data:`MODELS`
  (``teacher``; ``student`` as trained, fake-quantized; ``frozen``, its integer serving form), or of
  an export folder (its frozen student; the export bundles the tokenizer and generation config).
- :func:`write_jsonl`, :func:`write_pngs`: what ``--out`` writes.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import ml_collections
import numpy as np

from fraqat_jax.family import ConfigError, family_for_model

__all__ = ["MODELS", "GenerateError", "is_export", "load_model", "write_jsonl", "write_pngs"]

MODELS = ("teacher", "student", "frozen")


class GenerateError(ConfigError):
    """Bad input to generation (no run, a bad model name): the message names it."""


def is_export(path: str) -> bool:
    """Whether ``path`` is an orbax export (it holds a ``meta`` item) rather than a run."""
    return os.path.isdir(os.path.join(path, "meta"))


def load_model(workdir: str, model: str = "student", *, step: int | None = None):
    """``(model, cfg, family)`` of a run (``workdir/config.json``) or an orbax export (its frozen
    student, whatever ``model`` says; ``cfg.teacher`` then names the export's bundled tokenizer
    folder, ``tokenizer/``)."""
    if model not in MODELS:
        raise GenerateError(f"--model {model!r} is not allowed: use one of {', '.join(MODELS)}")
    if not os.path.isdir(workdir):
        raise GenerateError(f"--workdir {workdir!r} does not exist: give a run's workdir or an export folder")
    if is_export(workdir):
        from fraqat_jax.export.orbax import load, load_metadata

        meta = load_metadata(workdir)
        frozen = load(workdir)
        bundle = os.path.join(os.path.abspath(workdir), "tokenizer")
        cfg = ml_collections.ConfigDict({"teacher": bundle, "sample_steps": 20, "guidance_scale": 1.0,
                                         "image_size": 0, **{k: meta[k] for k in ("dtype",) if k in meta}})
        return frozen, cfg, family_for_model(frozen)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise GenerateError(f"--workdir {workdir!r} is not a run (no config.json) nor an export (no meta)")
    from fraqat_jax.runs import load_run, unscanned

    teacher, student, cfg = load_run(workdir, step=step, attention="xla")
    family = family_for_model(teacher)
    if model == "teacher":
        return teacher, cfg, family
    if model == "student":
        return student, cfg, family
    from fraqat_jax.nn import freeze

    return freeze(unscanned(student, cfg)), cfg, family


def write_jsonl(path: str, completions: Sequence) -> str:
    """One JSON line per continuation: ``{"prompt", "text", "tokens": N}`` (``text`` the continuation
    only; ``N`` its token count)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in completions:
            f.write(json.dumps({"prompt": c.prompt, "text": str(c), "tokens": len(c.tokens)}, ensure_ascii=False)
                    + "\n")
    return path


def write_pngs(folder: str, images: np.ndarray, names: Sequence[str]) -> list[str]:
    """``images`` (``uint8 [N, H, W, C]``, C 1 or 3) as ``folder/NAME.png`` (created if missing), pixel
    for pixel (grey images written as RGB); returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    os.makedirs(folder, exist_ok=True)
    paths = []
    for image, name in zip(np.asarray(images), names):
        rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
        path = os.path.join(folder, f"{name}.png")
        mpimg.imsave(path, np.ascontiguousarray(rgb, np.uint8))
        paths.append(path)
    return paths
