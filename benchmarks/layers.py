"""Cost of the NNX integration on a transformer MLP block (width 1024, hidden 4096).

Prints, each jitted and the median of several runs on this machine:
  * forward+backward of the W4A8 fake-quantized block (default rules: per-tensor weights,
    per-token activations) over the full-precision fp32 block;
  * forward of the frozen W4A8 block (packed int4 codes, int8 x int8 -> int32 matmuls) over the
    same block in bf16 (params and input bf16).

    python benchmarks/layers.py [--tokens 256] [--runs 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import freeze, quantize_model, set_bits


class MLPBlock(nnx.Module):
    def __init__(self, width=1024, hidden=4096, *, rngs, param_dtype=jnp.float32):
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs, param_dtype=param_dtype)
        self.fc2 = nnx.Linear(hidden, width, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def median_time(fn, *args, runs):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def fwd_bwd(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, x):
        def loss(p, x):
            return jnp.mean(nnx.merge(graphdef, p, rest)(x) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, x)

    return step, params


def forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    width, hidden = args.width, 4 * args.width
    x = jax.random.normal(jax.random.key(0), (args.tokens, width), jnp.float32)

    fp = MLPBlock(width, hidden, rngs=nnx.Rngs(0))
    q = quantize_model(nnx.clone(fp))
    set_bits(q, 4)
    step_fp, p_fp = fwd_bwd(fp)
    step_q, p_q = fwd_bwd(q)
    t_fp = median_time(step_fp, p_fp, x, runs=args.runs)
    t_q = median_time(step_q, p_q, x, runs=args.runs)

    bf16 = MLPBlock(width, hidden, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    frozen = freeze(q)
    f_bf16, s_bf16 = forward(bf16)
    f_frozen, s_frozen = forward(frozen)
    t_bf16 = median_time(f_bf16, s_bf16, x.astype(jnp.bfloat16), runs=args.runs)
    t_frozen = median_time(f_frozen, s_frozen, x, runs=args.runs)
    f_fp, s_fp = forward(fp)
    t_fp_fwd = median_time(f_fp, s_fp, x, runs=args.runs)

    print(f"device: {jax.devices()[0].device_kind}, block {width}->{hidden}->{width}, {args.tokens} tokens, "
          f"median of {args.runs}")
    print(f"fwd+bwd  fp32 {t_fp * 1e3:8.2f} ms   W4A8 fake-quant {t_q * 1e3:8.2f} ms   ratio {t_q / t_fp:.2f}x")
    print(f"forward  bf16 {t_bf16 * 1e3:8.2f} ms   W4A8 frozen     {t_frozen * 1e3:8.2f} ms   ratio {t_frozen / t_bf16:.2f}x")
    print(f"forward  fp32 {t_fp_fwd * 1e3:8.2f} ms   frozen / fp32 {t_frozen / t_fp_fwd:.2f}x")
    frozen_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(s_frozen))
    bf16_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(s_bf16))
    print(f"state bytes  frozen W4A8 / bf16: {frozen_bytes / bf16_bytes:.3f}")


if __name__ == "__main__":
    main()
