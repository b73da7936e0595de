"""Writes a latents cache (format: ``fraqat_jax.data.latents``) for text-to-image distillation.

Two modes::

    # Encode images + captions with the model's own VAE and text encoders (diffusers + torch,
    # an offline step; the trainer itself never imports torch):
    python scripts/cache_latents.py --pipeline /models/stable-diffusion-3.5-medium \\
        --images /data/ye_pop/images --captions /data/ye_pop/captions.jsonl --size 512 --out /data/ye_pop_sd35

    # Random latents and embeddings with a preset's shapes (dry runs, timing, tests):
    python scripts/cache_latents.py --random 64 --preset SD3.5-Medium --size 512 --out /tmp/sd35_random

``--captions`` is a JSON-lines file of ``{"file": "relative/path.jpg", "caption": "..."}`` rows.
Latents are stored scaled and shifted the way the pipeline feeds the transformer
(``(z - shift_factor) * scaling_factor``), embeddings as the pipeline's ``encode_prompt`` returns
them; everything as float16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fraqat_jax.data.latents import LatentsWriter  # noqa: E402

# Per family: latent channels, text length and width, pooled width, VAE downsampling.
_TEXT = {
    "SD3Transformer2DModel": lambda c: (c["in_channels"], 333, c["joint_attention_dim"], c["pooled_projection_dim"]),
    "PixArtTransformer2DModel": lambda c: (c["in_channels"], 300, c.get("caption_channels", 4096), None),
    "SanaTransformer2DModel": lambda c: (c["in_channels"], 300, c.get("caption_channels", 2304), None),
    "FluxTransformer2DModel": lambda c: (c["in_channels"] // 4, 256, c["joint_attention_dim"], c["pooled_projection_dim"]),
}
_DOWN = {"SanaTransformer2DModel": 32}


def fields_for(preset: str, size: int):
    from fraqat_jax.models import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"error: --preset {preset!r} is unknown; allowed: {', '.join(PRESETS)}")
    cls, cfg = PRESETS[preset]
    if cls not in _TEXT:
        raise SystemExit(f"error: --preset {preset!r} is not a text-to-image model ({cls})")
    c, length, width, pooled = _TEXT[cls]({**cfg})
    h = size // _DOWN.get(cls, 8)
    fields = {"latents": ((c, h, h), np.float16), "encoder_hidden_states": ((length, width), np.float16)}
    if pooled:
        fields["pooled_projections"] = ((pooled,), np.float16)
    return fields


def write_random(out: str, n: int, preset: str, size: int, seed: int = 0) -> None:
    fields = fields_for(preset, size)
    rng = np.random.default_rng(seed)
    w = LatentsWriter(out, n, fields, info={"mode": "random", "preset": preset, "size": size})
    for start in range(0, n, 16):
        stop = min(n, start + 16)
        w.write(start, {k: rng.standard_normal((stop - start, *s)).astype(t) for k, (s, t) in fields.items()})
    w.close()


def write_encoded(out: str, pipeline: str, images: str, captions: str, size: int, batch: int = 8) -> None:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(pipeline, transformer=None, torch_dtype=torch.float16)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    rows = [json.loads(line) for line in open(captions) if line.strip()]
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    writer = None
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        pix = []
        for r in chunk:
            im = Image.open(os.path.join(images, r["file"])).convert("RGB").resize((size, size), Image.BICUBIC)
            pix.append(np.asarray(im, np.float32) / 127.5 - 1.0)
        x = torch.from_numpy(np.stack(pix).transpose(0, 3, 1, 2)).to(pipe.device, torch.float16)
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.sample() - shift) * scale
            enc = pipe.encode_prompt([r["caption"] for r in chunk], **_prompt_kwargs(pipe))
        emb = enc[0]
        pooled = next((e for e in enc[1:] if e is not None and e.ndim == 2 and e.shape[0] == len(chunk)
                       and e.dtype.is_floating_point), None)
        arrays = {"latents": z, "encoder_hidden_states": emb}
        if pooled is not None:
            arrays["pooled_projections"] = pooled
        arrays = {k: v.float().cpu().numpy().astype(np.float16) for k, v in arrays.items()}
        if writer is None:
            writer = LatentsWriter(out, len(rows), {k: (v.shape[1:], np.float16) for k, v in arrays.items()},
                                   info={"mode": "encoded", "pipeline": pipeline, "size": size,
                                         "scaling_factor": scale, "shift_factor": shift, "captions": captions})
        writer.write(start, arrays)
        print(f"encoded {start + len(chunk)}/{len(rows)}", flush=True)
    writer.close()


def _prompt_kwargs(pipe):
    import inspect

    params = inspect.signature(pipe.encode_prompt).parameters
    kw = {}
    if "prompt_2" in params:
        kw["prompt_2"] = None
    if "prompt_3" in params:
        kw["prompt_3"] = None
    if "do_classifier_free_guidance" in params:
        kw["do_classifier_free_guidance"] = False
    return kw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--random", type=int, metavar="N", help="write N random examples (needs --preset)")
    p.add_argument("--preset", help="fraqat_jax.models.PRESETS name for --random")
    p.add_argument("--pipeline", help="diffusers pipeline folder (VAE + text encoders)")
    p.add_argument("--images")
    p.add_argument("--captions")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    if a.random:
        if not a.preset:
            p.error("--random needs --preset")
        write_random(a.out, a.random, a.preset, a.size)
    elif a.pipeline and a.images and a.captions:
        write_encoded(a.out, a.pipeline, a.images, a.captions, a.size, a.batch)
    else:
        p.error("give --random N --preset NAME, or --pipeline, --images and --captions")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
