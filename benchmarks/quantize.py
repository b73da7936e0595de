"""Cost of fake-quantizing a kernel before a matmul, relative to the plain matmul.

For a 4096x4096 fp32 kernel and a (256, 4096) input, times (quantize kernel + matmul) and
(matmul) each under ``jax.jit``, with ``bits`` a traced argument as in training, and prints the
ratio per tensor, per output channel and per group of 128 rows (median of several runs).

    python benchmarks/quantize.py [--repeats 20] [--bits 4.5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from fraqat_jax import quantize


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bits", type=float, default=4.5)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (args.size, args.size), jnp.float32)
    x = jax.random.normal(k2, (args.tokens, args.size), jnp.float32)
    bits = jnp.float32(args.bits)

    plain = jax.jit(lambda x, w: x @ w)
    base = median_seconds(plain, x, w, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}  kernel {args.size}x{args.size} fp32, input "
          f"({args.tokens}, {args.size}), bits {args.bits} (traced), median of {args.repeats}")
    print(f"plain matmul: {base * 1e3:.2f} ms")
    layouts = {
        "per tensor": dict(),
        "per channel": dict(channel_axis=-1),
        "per group of 128": dict(channel_axis=-1, group_size=128),
    }
    for name, kw in layouts.items():
        fq = jax.jit(lambda x, w, b, kw=kw: x @ quantize(w, b, **kw))
        t = median_seconds(fq, x, w, bits, repeats=args.repeats)
        print(f"{name:>17}: {t * 1e3:8.2f} ms   ratio to plain matmul {t / base:.2f}x")


if __name__ == "__main__":
    main()
