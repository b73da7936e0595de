"""Decode-time cost of the frozen W4A8 forms against float32, at one token and at many.

Prints, in one run, the median time of each form over fp32 (medians of ``--runs`` interleaved
calls, each jitted), by wall clock and by the process's CPU time (steadier on a shared machine),
with the weight bytes each form reads and the bandwidth that implies:

  * one Gemma-2-2B ``gate_proj`` (2304 -> 9216) at each ``--tokens`` count: fp32 ``nnx.Linear``;
    the frozen W4A8 layer in its ``"fused"`` form (split between threads at one token; opt-in), its
    ``"blocked"`` form (what ``"auto"`` runs on CPU up to 32 tokens) on the CPU layout's unpacked
    ``int8`` codes and on the packed ones (``freeze(unpack=False)``), and its ``"dense"`` form
    (int8 x int8 -> int32, what ``"auto"`` runs on accelerators); the frozen float path
    (``freeze(integer=False)``: the student's arithmetic on a kernel rebuilt once);
  * a one-token forward of a random ~110 M-parameter Gemma-2 (32k vocabulary, tied float
    embedding / LM head; no KV cache, so attention covers one position and the step reads the
    weights a decode step reads): the fp32 teacher against its frozen W4A8 student ("auto" on the
    unpacked and on the packed codes, and every layer "fused" or "dense").

With ``--tpu v5e:1x1`` it also compiles the layer forms for that TPU topology (libtpu, no TPU
needed) and prints the bytes XLA's cost model says each program accesses: the packed ``uint8``
codes against ``freeze(int4=True)``'s ``jnp.int4`` ones, bf16 and fp32.

    python benchmarks/decode_layer.py [--tokens 1,64] [--runs 15] [--no-model] [--tpu v5e:1x1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import freeze, quantize_model, set_bits
from fraqat_jax.models.gemma2 import Gemma2ForCausalLM

GATE_PROJ = (2304, 9216)  # Gemma-2-2B hidden -> intermediate
FUSED_TIMED_TOKENS = 8
MODEL_100M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 10,
              "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64, "query_pre_attn_scalar": 64,
              "sliding_window": 512, "max_position_embeddings": 1024}


def jitted(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    return lambda *args: fn(state, *args)


def weight_bytes(model) -> int:
    """Bytes of the weight-sized arrays of ``model`` that a CPU forward reads (float kernels or codes,
    embeddings; at least 2**16 values, so scales, norms and code sums are left out; of a layer that
    also holds its codes unpacked, the CPU layout of ``fraqat_jax.freeze``, the unpacked ones)."""
    flat = {tuple(path): v[...] for path, v in nnx.to_flat_state(nnx.state(model))}
    return int(sum(np.asarray(a).nbytes for path, a in flat.items()
                   if a is not None and np.size(a) >= 2**16
                   and not (path[-1] == "kernel_codes" and flat.get(path[:-1] + ("kernel_unpacked",)) is not None)))


def interleaved(fns: dict, args, runs: int) -> dict:
    """{name: (median wall s, median CPU s)} over ``runs`` rounds, each round calling every form once."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def report(title: str, times: dict, nbytes: dict) -> None:
    w0, c0 = times["fp32"]
    print(title)
    for name, (w, c) in times.items():
        print(f"  {name:28s} wall {w * 1e3:8.2f} ms  x{w / w0:5.2f} of fp32 | cpu {c * 1e3:8.2f} ms  x{c / c0:5.2f}"
              f" | weights {nbytes[name] / 2**20:7.1f} MiB, {nbytes[name] / w / 1e9:6.2f} GB/s by wall")


def frozen_forms(student) -> dict:
    forms = {}
    for form, unpack in (("fused", None), ("blocked", None), ("blocked", False), ("dense", None)):
        frozen = freeze(student, unpack=unpack)
        for _, node in nnx.iter_graph(frozen):
            if hasattr(node, "matmul"):
                node.matmul = form
        forms[f"W4A8 frozen {form}" + (", packed" if unpack is False else "")] = frozen
    forms["W4A8 float path"] = freeze(student, integer=False)
    return forms


_TPU_BYTES = """
import json, sys
from fraqat_jax.plan.topology import parse_topology, prepare_environment, topology_devices
top = parse_topology(sys.argv[1])
prepare_environment(top)
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import SingleDeviceSharding
from fraqat_jax import freeze, quantize_model, set_bits
sh = SingleDeviceSharding(topology_devices(top)[0])
n_in, n_out = json.loads(sys.argv[2])
fp = nnx.Linear(n_in, n_out, use_bias=False, rngs=nnx.Rngs(0))
student = quantize_model(nnx.clone(fp))
set_bits(student, 4)
models = {"fp32": fp, "bf16": nnx.Linear(n_in, n_out, use_bias=False, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                                          rngs=nnx.Rngs(0)),
          "W4A8 frozen, packed uint8": freeze(student, unpack=False), "W4A8 frozen, int4": freeze(student, int4=True)}
out = {}
for tokens in json.loads(sys.argv[3]):
    for name, model in models.items():
        graphdef, state = nnx.split(model)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state)
        x = jax.ShapeDtypeStruct((tokens, n_in), jnp.float32, sharding=sh)
        cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(abstract, x).compile().cost_analysis()
        out[f"{tokens} token(s): {name}"] = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
json.dump(out, sys.stdout)
"""


def tpu_bytes(topology: str, tokens: list[int]) -> None:
    """Bytes accessed by each layer form compiled for ``topology`` (in a subprocess: libtpu's
    environment must be set before JAX starts)."""
    env = {**os.environ, "JAX_PLATFORMS": ""}
    proc = subprocess.run([sys.executable, "-c", _TPU_BYTES, topology, json.dumps(GATE_PROJ), json.dumps(tokens)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        print(f"TPU compile failed: {proc.stderr.strip().splitlines()[-1]}")
        return
    print(f"gate_proj {GATE_PROJ[0]}->{GATE_PROJ[1]} compiled for {topology}: bytes accessed (XLA cost model)")
    for name, n in json.loads(proc.stdout).items():
        print(f"  {name:40s} {n / 2**20:9.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,64", help="comma-separated token counts for the layer")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model step")
    parser.add_argument("--tpu", metavar="TOPOLOGY", help="also compile the layer for this TPU topology (libtpu)")
    args = parser.parse_args()
    if args.tpu:
        tpu_bytes(args.tpu, [int(t) for t in args.tokens.split(",")])
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.1f}; medians of {args.runs} interleaved runs")

    n_in, n_out = GATE_PROJ
    fp = nnx.Linear(n_in, n_out, use_bias=False, rngs=nnx.Rngs(0))
    student = quantize_model(nnx.clone(fp))  # the default rules: per-tensor weights, per-token 8-bit inputs
    set_bits(student, 4)
    models = {"fp32": fp, **frozen_forms(student)}
    nbytes = {name: weight_bytes(m) for name, m in models.items()}
    nbytes["W4A8 float path"] = nbytes["fp32"]  # it reads its float kernel, not the codes
    fns = {name: jitted(m) for name, m in models.items()}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = jax.random.normal(jax.random.key(tokens), (tokens, n_in), jnp.float32)
        # the fused form widens the codes once per input row: timed up to FUSED_TIMED_TOKENS rows
        run = {k: f for k, f in fns.items() if tokens <= FUSED_TIMED_TOKENS or k != "W4A8 frozen fused"}
        ref = np.asarray(fns["W4A8 frozen dense"](x))
        for form in ("blocked", "blocked, packed", "fused"):  # same bits
            if f"W4A8 frozen {form}" in run:
                np.testing.assert_array_equal(np.asarray(fns[f"W4A8 frozen {form}"](x)), ref)
        report(f"gate_proj {n_in}->{n_out}, {tokens} token(s):", interleaved(run, (x,), args.runs), nbytes)

    if not args.no_model:
        teacher = Gemma2ForCausalLM(MODEL_100M, rngs=nnx.Rngs(0))
        params = sum(np.size(v[...]) for _, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param)))
        student = quantize_model(nnx.clone(teacher))
        set_bits(student, 4)
        forms = frozen_forms(student)
        models = {"fp32": teacher, "W4A8 frozen auto": forms["W4A8 frozen blocked"],
                  "W4A8 frozen auto, packed": forms["W4A8 frozen blocked, packed"],
                  "W4A8 frozen fused": forms["W4A8 frozen fused"], "W4A8 frozen dense": forms["W4A8 frozen dense"]}
        for name in ("W4A8 frozen auto", "W4A8 frozen auto, packed"):
            for _, node in nnx.iter_graph(models[name]):
                if hasattr(node, "matmul"):
                    node.matmul = "auto"
        nbytes = {name: weight_bytes(m) for name, m in models.items()}
        fns = {name: jitted(m) for name, m in models.items()}
        ids = jnp.array([[2]], jnp.int32)
        report(f"Gemma-2 {params / 1e6:.0f}M (random), one-token forward, batch 1:",
               interleaved(fns, (ids,), args.runs), nbytes)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
