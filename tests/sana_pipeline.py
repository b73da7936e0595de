"""A tiny random Sana text-to-image pipeline folder in the shipped teacher's layout, built offline
with diffusers and transformers and saved with ``SanaPipeline.save_pretrained``, and a two-step
run on it.

- ``transformer/``: a 2-layer ``SanaTransformer2DModel`` (random), ``sample_size`` 16, patch 2,
  4 latent channels, captions 64 wide;
- ``vae/``: a two-stage ``AutoencoderDC`` (random; factor 2, so 32x32 grayscale images);
- ``text_encoder/``: transformers ``Gemma2Model`` with the shipped tiny Gemma-2's weights,
  ``tokenizer/``: its tokenizer (``PreTrainedTokenizerFast``);
- ``scheduler/``: ``DPMSolverMultistepScheduler`` as Sana ships it (flow sigmas, ``flow_shift`` 3);
- ``fraqat.json``: image size 32, 16 text tokens, the empty null caption, caption templates.

Used by ``tests/eval/test_prompted.py`` and ``tests/test_export_pipeline.py``.
"""

from __future__ import annotations

import importlib.resources
import json
import os

import numpy as np

IMAGE_SIZE = 32
LATENT_SIZE = 16
MAX_SEQUENCE_LENGTH = 16
TEMPLATES = {"train": ["a handwritten {word}", "the digit {numeral}"], "heldout": ["a picture of a {word}"]}
SCHEDULER = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                 final_sigmas_type="zero", prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                 num_train_timesteps=1000)


def lm_folder() -> str:
    return str(importlib.resources.files("fraqat_jax").joinpath("assets", "tiny_gemma2"))


def build_pipeline(path: str) -> str:
    """Writes the pipeline folder ``path`` (see the module docstring); returns it."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=64,
        mlp_ratio=2.5, sample_size=LATENT_SIZE, patch_size=2, interpolation_scale=None)
    vae = AutoencoderDC(
        in_channels=1, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5)
    with torch.no_grad():  # give the random norms and output layers some spread, as trained ones have
        for p in list(transformer.parameters()) + list(vae.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    text_encoder = Gemma2Model.from_pretrained(lm_folder(), torch_dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(lm_folder())
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(**SCHEDULER))
    pipe.save_pretrained(path, safe_serialization=True)
    extras = {"image_size": IMAGE_SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH, "complex_human_instruction": None,
              "null_caption": "", "caption_dropout": 0.1, "templates": TEMPLATES,
              "digit_words": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]}
    with open(os.path.join(path, "fraqat.json"), "w") as f:
        json.dump(extras, f, indent=1)
    return path


def write_cache(pipe: str, out: str, num: int = 12) -> str:
    """A training cache (``fraqat_jax.data.latents``) of ``num`` captioned digits through the
    pipeline's DC-AE and text encoder, in JAX."""
    import jax

    from fraqat_jax.data.captions import PromptEncoder, caption, digit_images
    from fraqat_jax.data.latents import write_latents
    from fraqat_jax.models import load_vae

    images, labels = digit_images(IMAGE_SIZE)
    images, labels = images[:num], labels[:num]
    vae = load_vae(os.path.join(pipe, "vae"))
    latents = np.asarray(jax.jit(lambda x: vae.encode_latents(x))(images))
    hidden, mask = PromptEncoder(pipe)([caption(TEMPLATES["train"][i % 2], int(d)) for i, d in enumerate(labels)])
    write_latents(out, {"latents": latents.astype(np.float32), "encoder_hidden_states": hidden,
                        "encoder_attention_mask": mask.astype(np.int32)})
    return out


def train_run(pipe: str, cache: str, run: str, steps: int = 2) -> str:
    """A ``steps``-step W4A8 run with teacher ``pipe`` on ``cache``."""
    import pytest

    from fraqat_jax.train import __main__ as train_cli

    with pytest.MonkeyPatch.context() as mp:  # the CLI would turn on XLA's disk cache for this whole process
        mp.setenv("FRAQAT_COMPILATION_CACHE", "0")
        code = train_cli.main(["--workdir", run, "--steps", str(steps), "--log-every", "1",
                               "--set", f"teacher={pipe}", "--set", f"data=latents:{cache}",
                               "--set", "batch_size=2", "--set", "sample_grids=false", "--set", "warmup_steps=0",
                               "--set", "lr=1e-2", "--set", "progress=none", "--set", "schedule=constant"])
    assert code == 0
    return run


_BUILT: dict[str, str] = {}


def sana_run(tmp_path_factory) -> dict[str, str]:
    """``{"root", "pipe", "run"}``: the tiny pipeline and a two-step run on it, built once per session."""
    if not _BUILT:
        root = tmp_path_factory.mktemp("sana_pipeline")
        pipe = build_pipeline(str(root / "pipe"))
        cache = write_cache(pipe, str(root / "cache"))
        _BUILT.update(root=str(root), pipe=pipe, run=train_run(pipe, cache, str(root / "run")))
    return dict(_BUILT)


def diffusers_images(folder: str, prompts: list[str], noise: np.ndarray, steps: int) -> np.ndarray:
    """``SanaPipeline.from_pretrained(folder)`` on ``prompts`` from the initial latents ``noise``, at
    the trained size and text length, guidance at the pipeline's default: images ``[B, 1, S, S]``
    in [0, 1] (float32 throughout)."""
    import torch
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=steps, latents=torch.tensor(np.asarray(noise, np.float32)),
               height=IMAGE_SIZE, width=IMAGE_SIZE, use_resolution_binning=False, complex_human_instruction=None,
               max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="np").images
    return np.asarray(out, np.float64).transpose(0, 3, 1, 2)


def psnr01(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of images in [0, 1] (peak 1) over the whole batch."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
