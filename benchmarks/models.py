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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
