"""QAT cost on one transformer block of realistic width: step time and peak memory, QAT / FP.

The block is one SD3.5-Medium joint block (``JointTransformerBlock`` with the preset's width 1536,
24 heads of 64, RMS qk-norm, dual attention as in blocks 0-12), on ``--tokens`` image tokens and
``--text-tokens`` context tokens, batch ``--batch``. Two jitted training steps are compared, each
forward + backward + Adam update of every parameter with the loss ``mean((out - target)**2)``:

* FP: the block as built (``--dtype`` compute, fp32 parameters);
* QAT: the same block after ``fraqat_jax.quantize_model`` with the paper's rule (every linear
  layer, weights fake-quantized per tensor at a traced bit-width, inputs at 8 bits per token).

Reported, timings interleaved (FP, QAT, FP, QAT, ...) so that other load on the machine hits both
alike, medians of ``--iters``: the step time ratio QAT / FP, and the memory of each compiled step
from ``compiled.memory_analysis()`` (arguments + outputs - donated + temporaries) and their ratio.

    python benchmarks/block.py [--tokens 1024] [--text-tokens 333] [--iters 5] [--json PATH]
    python benchmarks/block.py --smoke            # tiny width, seconds on a CPU (keeps it working)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fraqat_jax import Rule, quantize_model, set_bits
from fraqat_jax.models import PRESETS
from fraqat_jax.models.mmdit import JointTransformerBlock

SMOKE = {"heads": 2, "head_dim": 16, "tokens": 16, "text_tokens": 8, "batch": 1, "iters": 2}


def block_config(smoke: bool) -> dict:
    """Width settings of the block: SD3.5-Medium's, or tiny ones for ``--smoke``."""
    _, preset = PRESETS["SD3.5-Medium"]
    if smoke:
        return {"heads": SMOKE["heads"], "head_dim": SMOKE["head_dim"], "qk_norm": preset["qk_norm"]}
    return {"heads": preset["num_attention_heads"], "head_dim": preset["attention_head_dim"],
            "qk_norm": preset["qk_norm"]}


def make_block(cfg: dict, *, quantized: bool, dtype, seed: int = 0):
    heads, head_dim = cfg["heads"], cfg["head_dim"]
    block = JointTransformerBlock(heads * head_dim, heads, head_dim, qk_norm=cfg["qk_norm"],
                                  use_dual_attention=True, rngs=nnx.Rngs(seed), dtype=dtype)
    if quantized:
        block = quantize_model(block, [Rule(r".*", weight_bits=8.0, act_bits=8.0, layer_types=("Linear",))])
    return block


def make_step(block, quantized: bool):
    """Jitted ``(params, opt_state, rest, bits, inputs) -> (params, opt_state, loss)``; ``bits``
    is traced, so one compilation serves every bit-width."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    tx = optax.adam(1e-4)

    def loss_fn(params, rest, bits, inputs):
        model = nnx.merge(graphdef, params, rest)
        ctx, img = model(inputs["x"], inputs["c"], inputs["temb"])
        out = img if ctx is None else jnp.concatenate([img, ctx], axis=1)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - inputs["target"]))

    def step(params, opt_state, rest, bits, inputs):
        if quantized:
            rest = set_bits(rest, bits)
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, bits, inputs)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), rest


def peak_bytes(compiled) -> int:
    """Memory of a compiled program while it runs, from its memory analysis: arguments + outputs -
    aliased (donated) + temporaries. (The CPU backend's ``peak_memory_in_bytes`` counts the
    arguments alone, so it is not used; the GPU's is reported beside it as ``backend_peak_bytes``.)"""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def backend_peak_bytes(compiled) -> int | None:
    peak = int(getattr(compiled.memory_analysis(), "peak_memory_in_bytes", 0) or 0)
    return peak or None


def run(*, smoke: bool = False, tokens: int | None = None, text_tokens: int | None = None,
        batch: int | None = None, iters: int | None = None, dtype: str = "float32", bits: float = 4.0) -> dict:
    """Builds both steps, times them interleaved and returns the figures (see the module docstring)."""
    cfg = block_config(smoke)
    tokens = tokens or (SMOKE["tokens"] if smoke else 1024)
    text_tokens = text_tokens or (SMOKE["text_tokens"] if smoke else 333)
    batch = batch or (SMOKE["batch"] if smoke else 1)
    iters = iters or (SMOKE["iters"] if smoke else 5)
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    dim = cfg["heads"] * cfg["head_dim"]
    k = jax.random.split(jax.random.key(1), 4)
    inputs = {"x": jax.random.normal(k[0], (batch, tokens, dim), jnp.float32),
              "c": jax.random.normal(k[1], (batch, text_tokens, dim), jnp.float32),
              "temb": jax.random.normal(k[2], (batch, dim), jnp.float32),
              "target": jax.random.normal(k[3], (batch, tokens + text_tokens, dim), jnp.float32)}
    b = jnp.float32(bits)
    runs = {}
    for name in ("fp", "qat"):
        block = make_block(cfg, quantized=name == "qat", dtype=compute)
        step, params, opt_state, rest = make_step(block, name == "qat")
        t0 = time.perf_counter()
        compiled = step.lower(params, opt_state, rest, b, inputs).compile()
        compile_s = time.perf_counter() - t0
        params, opt_state, loss = compiled(params, opt_state, rest, b, inputs)  # warm-up
        jax.block_until_ready(loss)
        runs[name] = {"compiled": compiled, "state": [params, opt_state], "rest": rest, "times": [],
                      "compile_s": compile_s, "peak_bytes": peak_bytes(compiled),
                      "backend_peak_bytes": backend_peak_bytes(compiled),
                      "n_params": sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))}
    for _ in range(iters):
        for r in runs.values():
            t0 = time.perf_counter()
            p, o, loss = r["compiled"](*r["state"], r["rest"], b, inputs)
            jax.block_until_ready(loss)
            r["times"].append(time.perf_counter() - t0)
            r["state"] = [p, o]
            if not np.isfinite(float(loss)):
                raise RuntimeError(f"non-finite loss {float(loss)} in the block benchmark")
    fp, qat = runs["fp"], runs["qat"]
    t_fp, t_qat = float(np.median(fp["times"])), float(np.median(qat["times"]))
    return {
        "block": "SD3.5-Medium JointTransformerBlock (dual attention, rms qk-norm)" + (" [smoke]" if smoke else ""),
        "width": dim, "heads": cfg["heads"], "tokens": tokens, "text_tokens": text_tokens, "batch": batch,
        "dtype": dtype, "bits": bits, "iters": iters, "params": fp["n_params"],
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "step_ms": {"fp": t_fp * 1e3, "qat": t_qat * 1e3},
        "step_ratio": t_qat / t_fp,
        "compile_s": {"fp": fp["compile_s"], "qat": qat["compile_s"]},
        "peak_bytes": {"fp": fp["peak_bytes"], "qat": qat["peak_bytes"]},
        "memory_ratio": qat["peak_bytes"] / fp["peak_bytes"],
        "backend_peak_bytes": {"fp": fp["backend_peak_bytes"], "qat": qat["backend_peak_bytes"]},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny block (CPU check that the script works)")
    p.add_argument("--tokens", type=int, default=None, help="image tokens (default 1024)")
    p.add_argument("--text-tokens", type=int, default=None, help="context tokens (default 333)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps of each kind (default 5)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(argv)
    r = run(smoke=a.smoke, tokens=a.tokens, text_tokens=a.text_tokens, batch=a.batch, iters=a.iters, dtype=a.dtype)
    print(f"device: {r['device']}  block: {r['block']}, width {r['width']}, {r['tokens']}+{r['text_tokens']} "
          f"tokens, batch {r['batch']}, {r['dtype']}, {r['params'] / 1e6:.1f}M params, median of {r['iters']}")
    print(f"fwd+bwd+Adam  FP {r['step_ms']['fp']:.1f} ms   QAT W4A8 {r['step_ms']['qat']:.1f} ms   "
          f"ratio {r['step_ratio']:.3f}")
    print(f"peak memory   FP {r['peak_bytes']['fp'] / 2**20:.1f} MiB   QAT {r['peak_bytes']['qat'] / 2**20:.1f} MiB   "
          f"ratio {r['memory_ratio']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
