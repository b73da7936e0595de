"""Writes a latents cache (format: ``fraqat_jax.data.latents``) for text-to-image distillation and
evaluation.

Three modes::

    # Training data: images + captions encoded with the model's own VAE and text encoders
    # (diffusers + torch, an offline step; the trainer itself never imports torch):
    python scripts/cache_latents.py --pipeline /models/stable-diffusion-3.5-medium \\
        --images /data/ye_pop/images --captions /data/ye_pop/captions.jsonl --size 512 --out /data/ye_pop_sd35

    # Evaluation prompts (one per line): their text embeddings and the empty prompt's, no images,
    # read by ``python -m fraqat_jax.eval --prompts CACHE``:
    python scripts/cache_latents.py --prompts pixart_sigma_prompts.txt \\
        --pipeline /models/stable-diffusion-3.5-medium --out /data/eval_prompts_sd35

    # Random latents and embeddings with a preset's shapes (dry runs, timing, tests):
    python scripts/cache_latents.py --random 64 --preset SD3.5-Medium --size 512 --out /tmp/sd35_random

``--captions`` is a JSON-lines file of ``{"file": "relative/path.jpg", "caption": "..."}`` rows.
Images are resized (shorter side to ``--size``, bicubic) and centre-cropped to ``size x size``.
Latents are the VAE posterior's mode, stored scaled and shifted the way the pipeline feeds the
transformer (``(z - shift_factor) * scaling_factor``; the DC-AE of Sana: ``z * scaling_factor``).
Text embeddings are what the pipeline's ``encode_prompt`` returns with the pipeline's own defaults
(``max_sequence_length``, Sana's complex human instruction, PixArt's caption cleaning):
``encoder_hidden_states``, plus ``pooled_projections`` (SD3, Flux) or ``encoder_attention_mask``
(PixArt, Sana: the padded caption's mask, which the pipelines pass to the transformer). The empty
prompt of a prompt cache is encoded as the pipeline encodes its default negative prompt ``""``.
Floats are stored as float16, masks as int32. Text encoders run in float16 on a GPU and in float32
on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fraqat_jax.data.latents import LatentsWriter, write_prompts  # noqa: E402

# Per family: latent channels, text length and width, pooled width, VAE downsampling.
_TEXT = {
    "SD3Transformer2DModel": lambda c: (c["in_channels"], 333, c["joint_attention_dim"], c["pooled_projection_dim"]),
    "PixArtTransformer2DModel": lambda c: (c["in_channels"], 300, c.get("caption_channels", 4096), None),
    "SanaTransformer2DModel": lambda c: (c["in_channels"], 300, c.get("caption_channels", 2304), None),
    "FluxTransformer2DModel": lambda c: (c["in_channels"] // 4, 256, c["joint_attention_dim"], c["pooled_projection_dim"]),
}
_DOWN = {"SanaTransformer2DModel": 32}

# encode_prompt's outputs with do_classifier_free_guidance=True, per family: the field each
# position holds, for the prompt and for the negative prompt. Flux has no negative prompt.
_OUTPUTS = {
    "sd3": ({"encoder_hidden_states": 0, "pooled_projections": 2}, {"encoder_hidden_states": 1, "pooled_projections": 3}),
    "pixart": ({"encoder_hidden_states": 0, "encoder_attention_mask": 1},
               {"encoder_hidden_states": 2, "encoder_attention_mask": 3}),
    "flux": ({"encoder_hidden_states": 0, "pooled_projections": 1}, None),
}
_OUTPUTS["sana"] = _OUTPUTS["pixart"]
# encode_prompt keywords whose value the pipeline's __call__ decides (taken from its defaults).
_CALL_DEFAULTS = ("max_sequence_length", "clean_caption", "complex_human_instruction")


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


# ------------------------------------------------------------------ the pipeline (torch)


def pipeline_family(pipeline: str) -> str:
    """The fraqat family (``sd3 | pixart | sana | flux``) of a diffusers pipeline folder, from the
    transformer class its ``model_index.json`` names."""
    from fraqat_jax.diffusion import FAMILIES

    path = os.path.join(pipeline, "model_index.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --pipeline {pipeline!r} is not a diffusers pipeline folder (no model_index.json)")
    with open(path) as f:
        cls = (json.load(f).get("transformer") or [None, None])[1]
    family = next((f.name for f in FAMILIES if cls in f.model_classes), None)
    if family not in _OUTPUTS:
        raise SystemExit(f"error: --pipeline {pipeline!r} has transformer {cls!r}; text-to-image pipelines of "
                         f"{', '.join(c for f in FAMILIES if f.name in _OUTPUTS for c in f.model_classes)} are supported")
    return family


def load_pipeline(pipeline: str):
    """``(pipe, family)``: the pipeline without its transformer, on the GPU in float16 if there is one,
    else on the CPU in float32."""
    import torch
    from diffusers import DiffusionPipeline

    family = pipeline_family(pipeline)
    cuda = torch.cuda.is_available()
    pipe = DiffusionPipeline.from_pretrained(pipeline, transformer=None,
                                             torch_dtype=torch.float16 if cuda else torch.float32)
    pipe.to("cuda" if cuda else "cpu")
    return pipe, family


def encode_text(pipe, family: str, prompts: list[str], max_sequence_length: int | None = None,
                negative: bool = False) -> dict[str, np.ndarray]:
    """The transformer's text inputs for ``prompts`` as the pipeline computes them: float32
    ``encoder_hidden_states`` [N, L, D] and ``pooled_projections`` [N, D'] or int32
    ``encoder_attention_mask`` [N, L]. ``negative=True``: the pipeline's negative-prompt encoding of
    ``""`` (one row; Flux, which has none, encodes ``""`` as a prompt)."""
    import inspect

    import torch

    params = inspect.signature(pipe.encode_prompt).parameters
    call = inspect.signature(pipe.__call__).parameters
    kw = {k: call[k].default for k in _CALL_DEFAULTS if k in params and k in call}
    if max_sequence_length:
        kw["max_sequence_length"] = int(max_sequence_length)
    kw.update({k: None for k in ("prompt_2", "prompt_3") if k in params})
    if "device" in params:
        kw["device"] = pipe.device
    positive, negative_at = _OUTPUTS[family]
    where = positive
    if negative and negative_at is not None:
        prompts, where = [""], negative_at
        kw.update(do_classifier_free_guidance=True, negative_prompt="")
    elif negative:
        prompts = [""]
    elif "do_classifier_free_guidance" in params:
        kw["do_classifier_free_guidance"] = False
    with torch.no_grad():
        out = pipe.encode_prompt(list(prompts), **kw)
    arrays = {}
    for name, i in where.items():
        a = out[i].detach().cpu()
        arrays[name] = a.to(torch.int32).numpy() if name == "encoder_attention_mask" else a.float().numpy()
    return arrays


def encode_images(pipe, pixels: np.ndarray) -> np.ndarray:
    """Images ``[B, H, W, 3]`` in [-1, 1] -> diffusion-space latents [B, C, H/f, W/f] (float32): the
    VAE posterior's mode (AutoencoderKL) or latent (AutoencoderDC), scaled as the pipeline scales."""
    import torch

    vae = pipe.vae
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(pipe.device, vae.dtype)
    with torch.no_grad():
        enc = vae.encode(x)
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z.float() - shift) * vae.config.scaling_factor).cpu().numpy()


def load_image(path: str, size: int) -> np.ndarray:
    """An RGB image, shorter side resized to ``size`` (bicubic), centre-cropped to ``size x size``;
    ``[size, size, 3]`` float32 in [-1, 1]."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    scale = size / min(im.size)
    w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, np.float32) / 127.5 - 1.0


def _stored(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.int32 if k == "encoder_attention_mask" else np.float16) for k, v in arrays.items()}


def _info(pipe, pipeline: str, **extra) -> dict:
    vae = pipe.vae.config
    return {"pipeline": os.path.abspath(pipeline), "scaling_factor": vae.scaling_factor,
            "shift_factor": getattr(vae, "shift_factor", None) or 0.0,
            "scheduler": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")
                          or k == "_class_name"}, **extra}


def write_encoded(out: str, pipeline: str, images: str, captions: str, size: int, batch: int = 8,
                  max_sequence_length: int | None = None) -> None:
    pipe, family = load_pipeline(pipeline)
    with open(captions) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"error: --captions {captions!r} holds no rows")
    writer = None
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        pixels = np.stack([load_image(os.path.join(images, r["file"]), size) for r in chunk])
        arrays = _stored({"latents": encode_images(pipe, pixels),
                          **encode_text(pipe, family, [r["caption"] for r in chunk], max_sequence_length)})
        if writer is None:
            writer = LatentsWriter(out, len(rows), {k: (v.shape[1:], v.dtype) for k, v in arrays.items()},
                                   info=_info(pipe, pipeline, mode="encoded", size=size, captions=os.path.abspath(captions)))
        writer.write(start, arrays)
        print(f"encoded {start + len(chunk)}/{len(rows)}", flush=True)
    writer.close()


def write_prompt_cache(out: str, pipeline: str, prompts_file: str, batch: int = 8,
                       max_sequence_length: int | None = None) -> None:
    with open(prompts_file) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompts {prompts_file!r} holds no prompts (one per line)")
    pipe, family = load_pipeline(pipeline)
    parts = [encode_text(pipe, family, prompts[i:i + batch], max_sequence_length) for i in range(0, len(prompts), batch)]
    cond = _stored({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    null = _stored(encode_text(pipe, family, [""], max_sequence_length, negative=True))
    write_prompts(out, cond, null, prompts, info=_info(pipe, pipeline, family=family, prompts_file=os.path.abspath(prompts_file)))
    print(f"encoded {len(prompts)} prompts", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (--pipeline with --images, --random)")
    p.add_argument("--random", type=int, metavar="N", help="write N random examples (needs --preset)")
    p.add_argument("--preset", help="fraqat_jax.models.PRESETS name for --random")
    p.add_argument("--pipeline", help="diffusers pipeline folder (VAE + text encoders; its transformer is not loaded)")
    p.add_argument("--images", help="image folder (with --captions)")
    p.add_argument("--captions", help="JSON lines of {\"file\", \"caption\"} (with --images)")
    p.add_argument("--prompts", metavar="FILE.txt", help="evaluation prompts, one per line: write a prompt cache")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens of the T5/Gemma encoder (default: the pipeline's own default)")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    if a.random:
        if not a.preset:
            p.error("--random needs --preset")
        write_random(a.out, a.random, a.preset, a.size)
    elif a.pipeline and a.prompts:
        write_prompt_cache(a.out, a.pipeline, a.prompts, a.batch, a.max_sequence_length)
    elif a.pipeline and a.images and a.captions:
        write_encoded(a.out, a.pipeline, a.images, a.captions, a.size, a.batch, a.max_sequence_length)
    else:
        p.error("give --random N --preset NAME, --pipeline DIR --prompts FILE.txt, or --pipeline, --images and --captions")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
