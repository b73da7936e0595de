"""Pretrains the built-in text-to-image teacher ``builtin:sana``: Sana's pipeline in miniature.

``python -m fraqat_jax.pretrain.sana [--part all|vae|transformer] [--out DIR]`` (also ``python -m
fraqat_jax.pretrain --size sana``) writes a diffusers ``SanaPipeline`` folder to
``fraqat_jax/assets/tiny_sana`` or ``--out``:

- ``tokenizer/`` and ``text_encoder/``: the shipped ``builtin:lm`` tiny Gemma-2 (its tokenizer, and
  its weights as a transformers ``Gemma2Model``: no LM head), frozen;
- ``vae/``: an ``AutoencoderDC`` (:data:`VAE_CONFIG`, one pixel-unshuffle stage: 2x compression)
  trained for reconstruction (mean squared error, AdamW) on the digits enlarged to
  :data:`IMAGE_SIZE` pixels; its ``scaling_factor`` is one over the standard deviation of the
  latents of the digits;
- ``transformer/``: a ``SanaTransformer2DModel`` (:data:`TRANSFORMER_CONFIG`, ``sample_size`` 16 =
  image size / 2, a sincos position embedding) trained with rectified flow (velocity ``noise - x0``,
  sigmas drawn as the flow-shifted sampler spends them: ``u`` uniform, ``sigma = s u / (1 + (s - 1)
  u)`` with ``s`` = :data:`FLOW_SHIFT`) on the DC-AE's latents, conditioned on the text encoder's
  last hidden states of captions from the training templates (:data:`TRAIN_TEMPLATES`), with
  :data:`CAPTION_DROPOUT` of the captions replaced by the empty caption so that classifier-free
  guidance works; AdamW, EMA of the weights (the EMA is saved). Its caption pathway is trained
  first and then held fixed (:func:`init_caption_pathway`);
- ``scheduler/``: ``DPMSolverMultistepScheduler`` with flow sigmas, as Sana ships it;
- ``fraqat.json``: the templates (training and held out), the text length, the image size, the
  caption conventions and each part's recipe and pretraining time (``pretraining``).

``--part vae`` retrains only the autoencoder (then the transformer must be retrained too: its
latents changed); ``--part transformer`` only the transformer, on the folder's autoencoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib.resources import files
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

from fraqat_jax.data.captions import (EXTRAS_FILE, PromptEncoder, caption, captioned_digits, digit_images,
                                     read_extras)
from fraqat_jax.diffusion.families import model_timestep
from fraqat_jax.diffusion.noise import shift_sigmas
from fraqat_jax.models import AutoencoderDC, SanaTransformer2DModel, from_diffusers, to_diffusers_state_dict
from fraqat_jax.models.autoencoder_dc import AUTOENCODER_DC_DEFAULTS
from fraqat_jax.models.pixart import cross_attention_mask
from fraqat_jax.models.convert import read_config
from fraqat_jax.models.transformers_folder import to_transformers_state_dict

__all__ = ["HELDOUT_TEMPLATES", "IMAGE_SIZE", "MAX_SEQUENCE_LENGTH", "SCHEDULER_CONFIG", "TRAIN_TEMPLATES",
           "TRANSFORMER_CONFIG", "VAE_CONFIG", "main", "pretrain_transformer", "pretrain_vae", "write_text_encoder"]

IMAGE_SIZE = 32
MAX_SEQUENCE_LENGTH = 32
CAPTION_DROPOUT = 0.1
FLOW_SHIFT = 3.0

_PREFIXES = ("", "a ", "the ", "a handwritten ", "the digit ", "a drawing of the number ", "an image of a ",
             "handwritten digit ", "a picture of ", "the number ", "a small ", "a white ")
_SUFFIXES = ("", ", written by hand", " on a black background", " in white ink", ", low resolution",
             " drawn with a pen")
#: Training captions: every prefix and suffix around the digit's word and numeral.
TRAIN_TEMPLATES = tuple(f"{p}{{{form}}}{s}" for form in ("word", "numeral") for p in _PREFIXES for s in _SUFFIXES)
#: Held-out captions: phrasings never trained on, for evaluation.
HELDOUT_TEMPLATES = ("a sketch of the number {word}", "a scanned {numeral}, pixelated",
                     "the handwritten numeral {numeral}", "a photo of a {word} on paper", "digit {word} in grey")

#: ``AutoencoderDC``'s defaults (Sana's f32c32 DC-AE) shrunk to two stages for 1-channel 32x32 digits.
VAE_CONFIG = {
    **AUTOENCODER_DC_DEFAULTS,
    "in_channels": 1,
    "latent_channels": 4,
    "attention_head_dim": 8,
    "encoder_block_out_channels": [16, 32],
    "decoder_block_out_channels": [16, 32],
    "encoder_layers_per_block": [1, 1],
    "decoder_layers_per_block": [1, 1],
    "encoder_qkv_multiscales": [[], []],
    "decoder_qkv_multiscales": [[], []],
    "scaling_factor": 1.0,
}
TRANSFORMER_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 4,
    "num_cross_attention_heads": 4,
    "cross_attention_head_dim": 16,
    "cross_attention_dim": 64,
    "caption_channels": 64,
    "mlp_ratio": 2.5,
    "dropout": 0.0,
    "attention_bias": False,
    "sample_size": 16,
    "patch_size": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 1,
    "guidance_embeds": False,
    "qk_norm": None,
    "timestep_scale": 1.0,
}
#: As Sana's pipelines ship it (DPM-Solver++ 2M on flow sigmas); keys not listed take diffusers' defaults.
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": FLOW_SHIFT,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
MODEL_INDEX = {
    "_class_name": "SanaPipeline",
    "_diffusers_version": "0.32.0",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    # the tokenizer is a byte-level BPE read as it is: transformers' Gemma tokenizer classes would
    # rebuild it as a SentencePiece-style model and tokenize differently
    "text_encoder": ["transformers", "Gemma2Model"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "SanaTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderDC"],
}


def _lm_dir() -> Path:
    return Path(str(files("fraqat_jax") / "assets" / "tiny_gemma2"))


def write_text_encoder(out: Path, lm_dir: Path | None = None) -> None:
    """``out/tokenizer`` and ``out/text_encoder`` from the ``builtin:lm`` folder (a ``Gemma2Model``:
    the causal LM's weights without the ``model.`` prefix, no LM head)."""
    from fraqat_jax.models.transformers_folder import from_transformers

    lm_dir = lm_dir or _lm_dir()
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(lm_dir / name, out / "tokenizer" / name)
    lm = from_transformers(lm_dir)
    tensors = to_transformers_state_dict(lm.model)  # keys relative to the causal LM's ``model``
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    config = {**read_config(lm_dir), "architectures": ["Gemma2Model"]}
    with open(out / "text_encoder" / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _save_diffusers(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers_state_dict(model), str(directory / "diffusion_pytorch_model.safetensors"))
    with open(directory / "config.json", "w") as f:
        json.dump({"_class_name": type(model).__name__, **dict(model.config)}, f, indent=1, sort_keys=True)


def _adamw(lr: float, steps: int):
    warmup = min(100, steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))


def _train(model, loss_fn, batches, steps: int, lr: float, *, ema_decay: float = 0.0, log_every: int = 100,
           name: str = "", frozen=None):
    """AdamW on ``loss_fn(model, batch, key)``; returns ``(model with the final or EMA weights, CPU
    seconds)``. ``frozen(path)``: whether the parameter at that ``keystr`` path stays as it is."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _adamw(lr, steps)
    if frozen is not None:
        tx = optax.chain(optax.masked(optax.set_to_zero(), jax.tree_util.tree_map_with_path(
            lambda path, _: frozen(jax.tree_util.keystr(path)), params)), tx)
    opt = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)

    @jax.jit
    def step(params, opt, ema, batch, key):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graph, p, rest), batch, key))(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return params, opt, ema, loss

    t0, c0, losses, key = time.perf_counter(), time.process_time(), [], jax.random.key(0)
    for i in range(steps):
        params, opt, ema, loss = step(params, opt, ema, batches(i), jax.random.fold_in(key, i))
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            print(f"{name} step {i + 1}/{steps}  loss {float(np.mean(jax.device_get(losses[-log_every:]))):.4f}  "
                  f"{(i + 1) / (time.perf_counter() - t0):.2f} it/s", flush=True)
    print(f"{name}: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU", flush=True)
    return nnx.merge(graph, ema if ema_decay else params, rest), time.process_time() - c0


def pretrain_vae(steps: int = 250, *, batch_size: int = 32, lr: float = 2e-3, seed: int = 0):
    """The DC-AE trained for reconstruction, its ``scaling_factor`` set; returns ``(vae, seconds)``."""
    images, _ = digit_images(IMAGE_SIZE)
    vae = AutoencoderDC(VAE_CONFIG, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)

    def loss_fn(model, x, key):
        return jnp.mean(jnp.square(model(x) - x))

    vae, seconds = _train(vae, loss_fn, lambda i: jnp.asarray(images[rng.integers(0, len(images), batch_size)]),
                          steps, lr, name="vae")
    z = np.asarray(jax.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(images)))
    recon = np.asarray(jax.jit(lambda m, x: m(x))(vae, jnp.asarray(images)))
    mse = float(np.mean(np.square(recon - images)))
    vae.config = {**vae.config, "scaling_factor": float(1.0 / z.std())}
    vae.scaling_factor = vae.config["scaling_factor"]
    print(f"vae reconstruction mse {mse:.5f}  latent std {z.std():.4f}", flush=True)
    return vae, seconds, mse


CAPTION_PROBE_STEPS = 600


def _caption_pathway(path: str) -> bool:
    """Whether a parameter (its ``jax.tree_util.keystr`` path) belongs to the caption pathway that
    :func:`init_caption_pathway` trains and the denoising then holds fixed."""
    return ("caption_projection" in path or "caption_norm" in path
            or ("attn2" in path and any(f"'{name}'" in path for name in ("to_q", "to_k", "to_v"))))


def init_caption_pathway(model: SanaTransformer2DModel, encoder: PromptEncoder, templates, *,
                         steps: int = CAPTION_PROBE_STEPS, batch_size: int = 32, lr: float = 1e-3,
                         seed: int = 0) -> float:
    """Trains the caption pathway of ``model`` to read the digit a caption names; returns the
    training captions' accuracy.

    The pathway is ``caption_projection`` and ``caption_norm``, then block 0's cross-attention with
    its query kernel zeroed, so the query is ``to_q``'s bias alone: one learned query that pools the
    caption's tokens whatever the image is. A linear read-out of the pooled vector is trained to
    classify the digit (cross-entropy, Adam) on the training captions ``templates`` x 10 digits;
    the read-out is then dropped and block 0's ``to_q`` / ``to_k`` / ``to_v`` copied to every block.
    The denoising training that follows holds these fixed (:func:`_caption_pathway`).

    Why: trained jointly from a random init, this small transformer learns to ignore the caption
    (its cross-attention stays near uniform over the template's words, where the digit's one or two
    tokens are outnumbered), while with the pathway fixed to a digit-reading pool it learns the
    digits as it does from a class label. Written here because no library trains a pooled
    cross-attention probe of a diffusers model's own modules.
    """
    captions = [caption(t, d) for d in range(10) for t in templates]
    labels = jnp.asarray(np.repeat(np.arange(10), len(templates)))
    hidden, mask = (jnp.asarray(a) for a in encoder(captions))
    attn = model.transformer_blocks[0].attn2
    attn.to_q.kernel[...] = jnp.zeros_like(attn.to_q.kernel[...])
    dim = attn.to_q.kernel.shape[0]

    class Probe(nnx.Module):
        def __init__(self):
            self.projection, self.norm, self.attn = model.caption_projection, model.caption_norm, attn
            self.readout = nnx.Linear(dim, 10, rngs=nnx.Rngs(seed))

        def __call__(self, h, m):
            context = self.norm(self.projection(h))
            query = jnp.zeros((h.shape[0], 1, dim), context.dtype)
            return self.readout(self.attn(query, context, attention_mask=cross_attention_mask(m, h.shape[0]))[:, 0])

    probe = Probe()
    graph, params, rest = nnx.split(probe, nnx.Param, ...)
    # the query kernel stays zero: only its bias may learn
    tx = optax.masked(optax.adam(lr), jax.tree_util.tree_map_with_path(
        lambda path, _: not ("to_q" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)), params))
    opt = tx.init(params)

    def loss_fn(params, idx):
        logits = nnx.merge(graph, params, rest)(hidden[idx], mask[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    @jax.jit
    def step(params, opt, key):
        idx = jax.random.randint(key, (batch_size,), 0, len(captions))
        grads = jax.grad(loss_fn)(params, idx)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    key = jax.random.key(seed)
    for i in range(steps):
        params, opt = step(params, opt, jax.random.fold_in(key, i))
    nnx.update(probe, params)
    accuracy = float(jnp.mean(jnp.argmax(probe(hidden, mask), -1) == labels))
    for block in model.transformer_blocks:
        for name in ("to_q", "to_k", "to_v"):
            source, target = getattr(attn, name), getattr(block.attn2, name)
            target.kernel[...] = source.kernel[...]
            target.bias[...] = source.bias[...]
    return accuracy


def pretrain_transformer(folder: Path, steps: int = 3000, *, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                         ema_decay: float = 0.995, resume: bool = False, probe_steps: int = CAPTION_PROBE_STEPS):
    """The Sana transformer trained with rectified flow on the folder's DC-AE latents and captions,
    its caption pathway trained first (:func:`init_caption_pathway`) and then held fixed
    (``resume``: from the folder's transformer instead, its caption pathway as it is)."""
    encoder = PromptEncoder(folder)
    source = captioned_digits(folder, seed=seed, caption_dropout=CAPTION_DROPOUT, encoder=encoder)
    if resume:
        model = from_diffusers(folder / "transformer")
    else:
        model = SanaTransformer2DModel(TRANSFORMER_CONFIG, rngs=nnx.Rngs(seed))
        templates = read_extras(folder)["templates"]["train"]  # the captions the source draws from
        accuracy = init_caption_pathway(model, encoder, templates, steps=probe_steps, seed=seed)
        print(f"caption pathway: {probe_steps} steps, digit accuracy on the training captions {accuracy:.3f}",
              flush=True)

    def loss_fn(model, batch, key):
        x0 = batch["latents"]
        k_sigma, k_noise = jax.random.split(key)
        noise = jax.random.normal(k_noise, x0.shape)
        u = jax.random.uniform(k_sigma, (x0.shape[0],))
        sigma = shift_sigmas(u, FLOW_SHIFT)
        s = sigma[:, None, None, None]
        out = model((1 - s) * x0 + s * noise, batch["encoder_hidden_states"], model_timestep("sana", sigma),
                    encoder_attention_mask=batch["encoder_attention_mask"])
        target = noise - x0
        return jnp.mean(jnp.square(out - target))

    return _train(model, loss_fn, lambda i: {k: jnp.asarray(v) for k, v in source.batch(i, batch_size).items()},
                  steps, lr, ema_decay=ema_decay, name="transformer", frozen=_caption_pathway)


def write_extras(out: Path, pretraining: dict) -> None:
    extras = {
        "image_size": IMAGE_SIZE,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "complex_human_instruction": None,
        "null_caption": "",
        "caption_dropout": CAPTION_DROPOUT,
        "templates": {"train": list(TRAIN_TEMPLATES), "heldout": list(HELDOUT_TEMPLATES)},
        "pretraining": pretraining,
    }
    with open(out / EXTRAS_FILE, "w") as f:
        json.dump(extras, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fraqat_jax.pretrain.sana", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=("all", "vae", "transformer"))
    parser.add_argument("--vae-steps", type=int, default=250)
    parser.add_argument("--steps", type=int, default=3000, help="transformer steps")
    parser.add_argument("--probe-steps", type=int, default=CAPTION_PROBE_STEPS,
                        help="steps of the caption pathway's digit probe before the transformer's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="transformer peak learning rate")
    parser.add_argument("--resume", action="store_true", help="continue from the folder's transformer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: the package's assets/tiny_sana)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.vae_steps < 1 or args.batch_size < 1 or args.probe_steps < 0:
        print(f"error: --steps, --vae-steps and --batch-size must be positive and --probe-steps not negative, got "
              f"{args.steps}, {args.vae_steps}, {args.batch_size}, {args.probe_steps}", file=sys.stderr)
        return 2
    out = Path(args.out or str(files("fraqat_jax") / "assets" / "tiny_sana"))
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if (out / EXTRAS_FILE).is_file():
        with open(out / EXTRAS_FILE) as f:
            old = json.load(f).get("pretraining", {})
    pretraining = dict(old)
    write_text_encoder(out)
    with open(out / "model_index.json", "w") as f:
        json.dump(MODEL_INDEX, f, indent=2)
    (out / "scheduler").mkdir(exist_ok=True)
    with open(out / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    if args.part in ("all", "vae"):
        vae, seconds, mse = pretrain_vae(args.vae_steps, batch_size=args.batch_size, seed=args.seed)
        _save_diffusers(vae, out / "vae")
        pretraining["vae"] = {"steps": args.vae_steps, "batch_size": args.batch_size, "cpu_seconds": round(seconds, 1),
                              "reconstruction_mse": round(mse, 6), "cpu": os.cpu_count()}
    write_extras(out, pretraining)
    if args.part in ("all", "transformer"):
        model, seconds = pretrain_transformer(out, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                              resume=args.resume, probe_steps=args.probe_steps)
        _save_diffusers(model, out / "transformer")
        runs = (pretraining.get("transformer", {}).get("runs", []) if args.resume else []) + [
            {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "probe_steps": 0 if args.resume else args.probe_steps,
             "sigmas": f"flow-shifted uniform, shift {FLOW_SHIFT}",
             "cpu_seconds": round(seconds, 1)}]
        pretraining["transformer"] = {"runs": runs, "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1),
                                      "cpu": os.cpu_count()}
        write_extras(out, pretraining)
    print(f"saved the pipeline to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
