"""Prompted-digit accuracy of a captioned-digits Sana pipeline folder's own teacher (no student).

    python scripts/sana_teacher_accuracy.py [FOLDER] [--guidance 4.5] [--steps 20]

Samples one image per prompt from fixed noise with the folder's transformer (Euler on the
scheduler's shifted flow sigmas, classifier-free guidance against the empty prompt), decodes with its
DC-AE, averages 4x4 boxes down to 8x8 and classifies with the shipped digits classifier. Prompt sets:
the folder's held-out templates x 10 digits, and :data:`UNLIKE` (phrasings unlike any template).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fraqat_jax.data.captions import PromptEncoder, caption, read_extras
from fraqat_jax.diffusion.samplers import euler_sample
from fraqat_jax.eval.classifier import DigitsClassifier
from fraqat_jax.models import from_diffusers

UNLIKE = ("please draw {word} for me", "my lucky number is {numeral}", "can you show me a {word}?",
          "{numeral} please", "write the symbol for {word} in big strokes")


def accuracy(folder, prompts, digits, *, guidance=4.5, steps=20, seed=0):
    folder = Path(folder)
    encoder = PromptEncoder(folder)
    vae, model = from_diffusers(folder / "vae"), from_diffusers(folder / "transformer")
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        shift = float(json.load(f).get("flow_shift", 1.0))
    hidden, mask = encoder(prompts)
    null_h, null_m = encoder([read_extras(folder).get("null_caption", "")])
    c = model.config
    noise = jax.random.normal(jax.random.key(seed), (len(prompts), c["in_channels"], c["sample_size"], c["sample_size"]))

    @jax.jit
    def run(noise, h, m):
        fn = lambda x, t, cond: model(x, cond["h"], t, encoder_attention_mask=cond["m"])  # noqa: E731
        lat = euler_sample(fn, noise, {"h": h, "m": m}, num_steps=steps, shift=shift, guidance_scale=guidance,
                           null_cond={"h": jnp.asarray(null_h), "m": jnp.asarray(null_m)})
        return vae.decode_latents(lat)

    images = np.asarray(run(noise, jnp.asarray(hidden), jnp.asarray(mask)))
    n, ch, s, _ = images.shape
    small = np.clip(images.reshape(n, ch, 8, s // 8, 8, s // 8).mean(axis=(3, 5)), -1, 1)
    return DigitsClassifier.load().accuracy(small, np.asarray(digits)), images


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parents[1] / "fraqat_jax" / "assets" / "tiny_sana"))
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    extras = read_extras(a.folder)
    for name, templates in (("heldout", extras["templates"]["heldout"]), ("unlike", UNLIKE),
                            ("train", extras["templates"]["train"][::24])):
        prompts = [caption(t, d) for t in templates for d in range(10)]
        digits = [d for _ in templates for d in range(10)]
        acc, _ = accuracy(a.folder, prompts, digits, guidance=a.guidance, steps=a.steps)
        print(f"{name}: {len(prompts)} prompts, guidance {a.guidance}, {a.steps} Euler steps: accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
