"""Forward time of the SD3.5-Medium transformer in our NNX port vs diffusers' PyTorch model.

512x512 images: latents [1, 16, 64, 64] (4096 image tokens), 333 text tokens of width 4096,
batch 1, bf16 parameters and compute in both frameworks, the same random weights, on whatever
device is present (JAX default backend; torch CUDA if available, else CPU). Prints the median
of ``--runs`` timed calls after a warm-up/compile call, the ratio JAX / PyTorch, and the largest
output difference between the two (a sanity check; bf16 differs in rounding).

The full model has 24 blocks. On a CPU that is minutes per forward, so ``--layers`` builds a
truncated stack with the first N blocks (SD3.5-Medium's dual-attention blocks are 0-12; the
last block of any stack is context_pre_only, as in the full model). Default: all 24 on a GPU/TPU,
1 on CPU; the output says which.

    python benchmarks/models.py [--layers N] [--runs R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from fraqat_jax.models import PRESETS, SD3Transformer2DModel
from fraqat_jax.models.convert import load_state_dict


def median_seconds(fn, runs: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="blocks to keep (default: 24 on GPU/TPU, 1 on CPU)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed calls per framework, median reported (default: 5 on GPU/TPU, 2 on CPU)")
    parser.add_argument("--text-tokens", type=int, default=333, help="context length (CLIP 77 + T5 256)")
    parser.add_argument("--model", choices=("sd3.5", "pixart", "sana", "flux"), default="sd3.5",
                        help="sd3.5 (this script's default) or an issue-5 port (see bench_issue5)")
    args = parser.parse_args()
    if args.model != "sd3.5":
        backend = jax.default_backend()
        return bench_issue5(args.model, args.layers, args.runs or (5 if backend != "cpu" else 2))

    _, preset = PRESETS["SD3.5-Medium"]
    full_layers = preset["num_layers"]
    backend = jax.default_backend()
    layers = args.layers if args.layers is not None else (full_layers if backend != "cpu" else 1)
    runs = args.runs if args.runs is not None else (5 if backend != "cpu" else 2)
    if not 1 <= layers <= full_layers:
        raise ValueError(f"--layers must be in [1, {full_layers}], got {layers}")
    config = dict(preset, num_layers=layers,
                  dual_attention_layers=tuple(i for i in preset["dual_attention_layers"] if i < layers))

    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = diffusers_model(config).to(device=torch_device, dtype=torch.bfloat16).eval()
    tensors = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in ref.state_dict().items()}
    abstract = nnx.eval_shape(
        lambda: SD3Transformer2DModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    )
    model = load_state_dict(abstract, tensors)
    del tensors

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 16, 64, 64)).astype(np.float32)
    context = rng.standard_normal((1, args.text_tokens, preset["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((1, preset["pooled_projection_dim"])).astype(np.float32)
    timestep = np.array([500.0], np.float32)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    jax_inputs = [jnp.asarray(a, jnp.bfloat16) for a in (latents, context, pooled)] + [jnp.asarray(timestep)]
    jax_out = {}

    def run_jax():
        jax_out["y"] = jax.block_until_ready(forward(state, *jax_inputs))

    torch_inputs = [torch.from_numpy(a).to(torch_device, torch.bfloat16) for a in (latents, context, pooled)]
    torch_inputs.append(torch.from_numpy(timestep).to(torch_device))
    torch_out = {}

    def run_torch():
        with torch.inference_mode():
            torch_out["y"] = ref(*torch_inputs[:1], encoder_hidden_states=torch_inputs[1],
                                 pooled_projections=torch_inputs[2], timestep=torch_inputs[3]).sample
        if torch_device == "cuda":
            torch.cuda.synchronize()

    t_jax = median_seconds(run_jax, runs)
    t_torch = median_seconds(run_torch, runs)
    diff = float(np.abs(np.asarray(jax_out["y"], np.float32) - torch_out["y"].float().cpu().numpy()).max())
    scale = float(torch_out["y"].float().abs().max())

    stack = "full stack" if layers == full_layers else f"TRUNCATED stack: first {layers} of {full_layers} blocks"
    print(f"SD3.5-Medium transformer forward, latents 1x16x64x64 + {args.text_tokens} text tokens, bf16, {stack}")
    print(f"jax    ({jax.devices()[0].device_kind}, {backend}): {t_jax * 1e3:10.1f} ms  (median of {runs})")
    print(f"torch  ({torch_device}, diffusers):       {t_torch * 1e3:10.1f} ms  (median of {runs})")
    print(f"ratio jax / torch: {t_jax / t_torch:.2f}  (< 1: the JAX port is faster)")
    print(f"max |jax - torch| = {diff:.3g} (max |out| = {scale:.3g}; bf16 rounding)")


def diffusers_model(config):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return diffusers.SD3Transformer2DModel(**config)


# ---------------------------------------------------------------------------------------------
# PixArt-Sigma, Sana and FLUX.1: same protocol, ~1024 image tokens each.
#   python benchmarks/models.py --model pixart|sana|flux [--layers N] [--runs 3]
# --layers N keeps the first N blocks (Flux: N double-stream and 2N single-stream blocks).
# ---------------------------------------------------------------------------------------------


def _issue5_case(name: str, layers: int | None, backend: str):
    """(preset name, truncated config, label, numpy inputs) for one of the issue-5 ports."""
    rng = np.random.default_rng(0)
    valid_caption = np.zeros((1, 300), np.int64)
    valid_caption[:, :120] = 1  # a padded T5/Gemma caption: 120 real tokens of 300
    if name == "flux":
        preset = "FLUX.1-schnell"
        _, config = PRESETS[preset]
        full = config["num_layers"]
        n = layers if layers is not None else (full if backend != "cpu" else 1)
        if not 1 <= n <= full:
            raise ValueError(f"--layers must be in [1, {full}] for flux, got {n}")
        config = dict(config, num_layers=n, num_single_layers=min(2 * n, config["num_single_layers"]))
        grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1).reshape(-1, 2)
        inputs = dict(
            hidden_states=rng.standard_normal((1, 1024, 64)),
            encoder_hidden_states=rng.standard_normal((1, 512, config["joint_attention_dim"])),
            pooled_projections=rng.standard_normal((1, config["pooled_projection_dim"])),
            timestep=np.array([1.0]),
            img_ids=np.concatenate([np.zeros((1024, 1)), grid], axis=1),
            txt_ids=np.zeros((512, 3)),
        )
        label = (f"FLUX.1-schnell, 512x512 (1024 packed tokens + 512 text tokens), "
                 f"{n}/{full} double + {config['num_single_layers']}/38 single blocks")
        return preset, config, label, {k: v.astype(np.float32) for k, v in inputs.items()}
    preset = {"pixart": "PixArt-Sigma-XL-2-512", "sana": "Sana-1.6B"}[name]
    _, config = PRESETS[preset]
    full = config["num_layers"]
    n = layers if layers is not None else (full if backend != "cpu" else 1)
    if not 1 <= n <= full:
        raise ValueError(f"--layers must be in [1, {full}] for {name}, got {n}")
    config = dict(config, num_layers=n)
    latent = (1, 4, 64, 64) if name == "pixart" else (1, 32, 32, 32)
    inputs = dict(
        hidden_states=rng.standard_normal(latent),
        encoder_hidden_states=rng.standard_normal((1, 300, config["caption_channels"])),
        timestep=np.array([500.0]),
        encoder_attention_mask=valid_caption,
    )
    size = "512x512" if name == "pixart" else "1024x1024"
    label = f"{preset}, {size} (1024 image tokens, 120/300 caption tokens), {n}/{full} blocks"
    return preset, config, label, {k: v.astype(np.int32 if k == "encoder_attention_mask" else np.float32)
                                   for k, v in inputs.items()}


def bench_issue5(name: str, layers: int | None, runs: int) -> None:
    """Forward time of the PixArt / Sana / Flux port vs diffusers, bf16, same random weights."""
    import diffusers

    from fraqat_jax.models import MODEL_CLASSES

    diffusers.utils.logging.set_verbosity_error()

    backend = jax.default_backend()
    preset, config, label, inputs = _issue5_case(name, layers, backend)
    class_name = PRESETS[preset][0]
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = getattr(diffusers, class_name)(**config).to(device=torch_device, dtype=torch.bfloat16).eval()
    tensors = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in ref.state_dict().items()}
    abstract = nnx.eval_shape(lambda: MODEL_CLASSES[class_name](
        config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    model = load_state_dict(abstract, tensors)
    del tensors

    # timesteps, masks and ids stay float32/int; activations go in as bf16 in both frameworks
    exact = ("timestep", "encoder_attention_mask", "img_ids", "txt_ids")
    jax_inputs = {k: jnp.asarray(v) if k in exact else jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
    torch_inputs = {k: torch.from_numpy(v).to(torch_device) for k, v in inputs.items()}
    torch_inputs = {k: v if k in exact else v.to(torch.bfloat16) for k, v in torch_inputs.items()}

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw))
    out = {}

    def run_jax():
        out["jax"] = jax.block_until_ready(forward(state, jax_inputs))

    def run_torch():
        with torch.inference_mode():
            out["torch"] = ref(**torch_inputs, return_dict=False)[0]
        if torch_device == "cuda":
            torch.cuda.synchronize()

    t_jax = median_seconds(run_jax, runs)
    t_torch = median_seconds(run_torch, runs)
    diff = float(np.abs(np.asarray(out["jax"], np.float32) - out["torch"].float().cpu().numpy()).max())
    scale = float(out["torch"].float().abs().max())
    print(f"{label}, batch 1, bf16")
    print(f"jax    ({jax.devices()[0].device_kind}, {backend}): {t_jax * 1e3:10.1f} ms  (median of {runs})")
    print(f"torch  ({torch_device}, diffusers):       {t_torch * 1e3:10.1f} ms  (median of {runs})")
    print(f"ratio jax / torch: {t_jax / t_torch:.2f}  (< 1: the JAX port is faster)")
    print(f"max |jax - torch| = {diff:.3g} (max |out| = {scale:.3g}; bf16 rounding)")


if __name__ == "__main__":
    main()
