"""FraQAT train-step cost on the default model.

Prints (1) the time of a FraQAT distillation step (W_b A8 fake-quantized student) against the same
distillation step with an unquantized student, as a ratio; (2) the number of compilations of the
jitted step over a whole bit-width schedule (must be 1: bits are data, not structure); (3) peak
memory (device allocator peak where the backend reports it, else the process's peak RSS).

    python benchmarks/train_step.py [--iters 30] [--json PATH] [--set KEY=VALUE ...]

The two steps are timed interleaved (quantized, unquantized, quantized, ...) so that load from other
processes on a shared machine hits both alike; the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.data import make_source
from fraqat_jax.train import load_config
from fraqat_jax.train.step import make_schedule
from fraqat_jax.diffusion import family_of
from fraqat_jax.train.models import load_teacher, make_student
from fraqat_jax.train.step import make_lr_schedule, make_optimizer, make_train_step


def build(cfg):
    teacher = load_teacher(cfg)
    student = make_student(teacher, cfg)
    tg, ts = nnx.split(teacher)
    sg, params, rest = nnx.split(student, nnx.Param, ...)
    params, rest, ts = nnx.to_pure_dict(params), nnx.to_pure_dict(rest), nnx.to_pure_dict(ts)
    params = jax.tree.map(jnp.copy, params)  # the step donates the student's buffers; the teacher keeps its own
    tx = make_optimizer(cfg)
    step_fn = make_train_step(cfg, schedule=make_schedule(cfg), teacher_graph=tg, student_graph=sg,
                              family=family_of(teacher), tx=tx, lr_schedule=make_lr_schedule(cfg))
    state = {"params": params, "opt_state": tx.init(params), "ema": None, "step": jnp.zeros((), jnp.int32)}
    return step_fn, state, ts, rest


def time_interleaved(cfgs, batches, iters):
    """Median step time of each config, the configs' steps alternating (so that load from other
    processes on a shared machine hits both alike)."""
    built = [build(cfg) for cfg in cfgs]
    states = []
    for step_fn, state, ts, rest in built:
        state, m = step_fn(state, ts, rest, batches[0])  # compile
        jax.block_until_ready(m)
        states.append(state)
    times = [[] for _ in cfgs]
    for i in range(iters):
        for j, (step_fn, _, ts, rest) in enumerate(built):
            t0 = time.perf_counter()
            states[j], m = step_fn(states[j], ts, rest, batches[i % len(batches)])
            jax.block_until_ready(m["loss"])
            times[j].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times], [(b[0], s, b[2], b[3]) for b, s in zip(built, states)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(argv)
    cfg = load_config(None, a.set)
    src = make_source(cfg.data, seed=cfg.seed, image_size=int(cfg.image_size) or None)
    batches = [{k: jnp.asarray(v) for k, v in src.batch(i, cfg.batch_size).items()} for i in range(4)]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: {cfg.teacher}  batch {cfg.batch_size}")

    fp = load_config(None, [*a.set, "quant_rules=none"])
    (t_q, t_fp), built = time_interleaved([cfg, fp], batches, a.iters)
    print(f"FraQAT step {t_q * 1e3:.2f} ms, unquantized-student step {t_fp * 1e3:.2f} ms, ratio {t_q / t_fp:.2f}")
    report = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "model": cfg.teacher,
              "batch_size": int(cfg.batch_size), "iters": a.iters,
              "step_ms": {"fraqat": t_q * 1e3, "fp": t_fp * 1e3}, "step_ratio": t_q / t_fp}

    step_fn, state, ts, rest = built[0]  # the quantized step, compiled once above
    state = {**state, "step": jnp.zeros((), jnp.int32)}  # from the schedule's start
    bits_seen = set()
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        state, m = step_fn(state, ts, rest, batches[i % len(batches)])
        bits_seen.add(float(m["bits"]))
    jax.block_until_ready(state)
    print(f"whole {cfg.schedule} schedule: {cfg.steps} steps, {len(bits_seen)} bit-widths {sorted(bits_seen, reverse=True)}, "
          f"train-step compilations: {step_fn._cache_size()} ({time.perf_counter() - t0:.1f}s)")
    report["schedule"] = {"name": cfg.schedule, "steps": int(cfg.steps), "bit_widths": sorted(bits_seen, reverse=True),
                          "compiles": int(step_fn._cache_size()), "seconds": time.perf_counter() - t0}

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
        report["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak process RSS: {rss:.0f} MiB")
    report["peak_rss_mib"] = rss
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
