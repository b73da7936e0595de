"""Shared settings of the paper's runs (FraQAT, W4A8 diffusion transformers), imported by the preset files.

The paper trains 25 epochs of YE-POP at 512x512 with fused Adam, no weight decay, seed 1234 and
the FraQAT schedule; it states the learning rate and batch but no learning-rate schedule, so we
hold the rate constant after a short warmup. Steps: 25 epochs of the user's cache (set ``steps``
to ``25 * examples // batch_size``; 25000 is a placeholder). Teacher and data come from the
environment so the same file serves any machine:

- ``FRAQAT_TEACHER``: a diffusers transformer folder (default: the preset with random weights,
  which runs but only makes sense for timing);
- ``FRAQAT_LATENTS``: a cache written by ``scripts/cache_latents.py`` (see fraqat_jax.data.latents).
"""

import os


def paper_config(preset: str, *, lr: float, batch_size: int, latents: str, **extra) -> dict:
    return {
        "teacher": os.environ.get("FRAQAT_TEACHER", f"preset:{preset}"),
        "data": "latents:" + os.environ.get("FRAQAT_LATENTS", latents),
        "schedule": "fraqat",
        "steps": 25000,
        "lr": lr,
        "batch_size": batch_size,
        "lr_schedule": "constant",
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "clip_norm": 1.0,
        "seed": 1234,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "remat": True,
        "scan_layers": True,  # compile time and host memory independent of depth
        "attention": "auto",  # cuDNN on GPU, Pallas flash on TPU
        "mesh": "fsdp=-1",
        "log_every": 10,
        "checkpoint_every": 500,
        "keep_checkpoints": 3,
        "num_samples": 4,
        "sample_steps": 28,
        **extra,
    }
