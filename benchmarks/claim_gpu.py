"""The regime map of docs/claim.md on one lent accelerator (or any machine), in priority order,
within a time budget, many comparisons side by side. Run through ``benchmarks/claim_gpu.sh``.

    python benchmarks/claim_gpu.py [--budget SECONDS] [--out PATH] [--parallel N] [--workdir DIR]
                                   [--cells NAME,...] [--smoke]

Each job is one ``python -m fraqat_jax.compare --seeds 1 --set seed=S`` of one cell (a one-seed
comparison: every method of the cell at that seed, so the seed's methods stay paired even when the
budget cuts the map). Jobs start in :data:`CELLS` order (the paper's regime first, seed after seed)
while ``--parallel`` of them run at once; a job is killed at the budget's end. After every finished
job the JSON at ``--out`` is rewritten whole (per cell, per seed, per method: ``val_loss``, ``fd``
and the run's ``diagnostics``; per cell the paired statistics of the seeds so far), so a call cut
off by its deadline still leaves every finished seed. ``docs/claim_map.py`` pools such files.

``--smoke``: two cells, one seed each, 4 steps, tiny scoring: a CPU check (under a minute on two
cores) that the script, the comparison and the JSON keys still work.

The seeds, methods and settings of a cell are the same as the CPU runs in docs/claim.md, so cells
pool across calls (per machine: per-seed values do not carry across machines, see
docs/claim.md, "Cross-machine reproducibility").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, ROOT)

FIRST_SEED = 1234
PAPER = ["--steps", "2000", "--set", "lr=1e-5", "--set", "lr_schedule=constant"]

#: name -> (what differs from the default, compare arguments, methods, seeds wanted); priority order.
CELLS = {
    "paper": ("lr 1e-5 constant, 2000 steps (the paper's regime)", PAPER, "ptq,qat,fraqat,linear:0.44", 8),
    "continuous": ("default, continuous schedules over the staircase's span", [], "ptq,qat,linear:0.44,cosine:0.44", 10),
    "steps900": ("900 steps", ["--steps", "900"], "ptq,qat,fraqat", 20),
    "paper_4000": ("lr 1e-5 constant, 4000 steps", ["--steps", "4000", "--set", "lr=1e-5", "--set", "lr_schedule=constant"],
                   "ptq,qat,fraqat,linear:0.44", 8),
    "paper_lr3e-6": ("lr 3e-6 constant, 2000 steps", ["--steps", "2000", "--set", "lr=3e-6", "--set", "lr_schedule=constant"],
                     "ptq,qat,fraqat,linear:0.44", 8),
    "paper_restart": ("lr 1e-5 restart per stage, 2000 steps", ["--steps", "2000", "--set", "lr=1e-5", "--set", "lr_schedule=restart"],
                      "ptq,qat,fraqat", 8),
    "paper_more": ("lr 1e-5 constant, 2000 steps (the paper's regime), seeds beyond the first 8", PAPER,
                   "ptq,qat,fraqat,linear:0.44", 16),
    # Sana's architecture (the tiny SanaPipeline teacher): validation loss here; prompted-digit accuracy and
    # FD of the decoded images come from benchmarks/claim_sana.py on the same seeds
    "sana": ("configs/sana_default.py (Sana's pipeline in miniature)", ["--config", "configs/sana_default.py"],
             "ptq,qat,fraqat", 10),
}
SMOKE_CELLS = ("paper", "continuous")
MAX_LISTED_CHANGES = 12  # more changes of bits than this are summarised, not listed per step
SMOKE_ARGS = ["--steps", "4", "--num-samples", "2", "--num-val", "4", "--set", "batch_size=8", "--set", "warmup_steps=1"]
SMOKE_METHODS = {"paper": "ptq,qat,linear:0.44", "continuous": "qat,cosine:0.44"}


def seed_rows(compare_json: str) -> dict[str, dict]:
    """One-seed ``compare.json`` -> ``{method: {"val_loss", "fd", "diagnostics"}}`` (and ``"ppl"``,
    the held-out perplexity, for a text comparison)."""
    with open(compare_json) as f:
        rows = json.load(f)
    out = {}
    for r in rows:
        per = r.get("per_seed", {})
        diag = (r.get("diagnostics") or [None])[0]
        changes = (diag or {}).get("bit_changes", [])
        if len(changes) > MAX_LISTED_CHANGES:  # a continuous schedule changes bits at every step
            jumps = [c["jump"] for c in changes if c.get("jump") is not None]
            diag = dict(diag, bit_changes=[], bit_change_summary={
                "changes": len(changes), "first_step": changes[0]["step"], "last_step": changes[-1]["step"],
                "largest_jump": max(jumps) if jumps else None})
        out[r["method"]] = {"val_loss": (per.get("val_loss") or [None])[0], "fd": (per.get("fd") or [None])[0],
                            "diagnostics": diag}
        if per.get("ppl"):
            out[r["method"]]["ppl"] = per["ppl"][0]
    return out


def paired_stats(seeds: dict[str, dict]) -> dict[str, dict]:
    """``{seed: {method: {"val_loss", "fd", "diagnostics"}}}`` -> per method, against vanilla QAT
    at the same seeds: ``seeds``, ``val_loss_ratio`` (mean of per-seed ratios) with its 95% paired-t
    ``val_loss_ratio_ci`` and ``verdict`` (``fraqat_jax.compare.stats``), the same for ``fd`` (and
    ``ppl`` where the seeds have it),
    ``better_on`` (seeds with a ratio below 1), and the diagnostics' medians: the first training
    loss at the target bits / PTQ's validation loss, and the loss jump at each change of bits."""
    import numpy as np

    from fraqat_jax.compare.stats import paired, verdict

    order = [s for s in sorted(seeds, key=int) if "qat" in seeds[s]]
    methods = list(dict.fromkeys(m for s in order for m in seeds[s]))
    out = {}
    for m in methods:
        have = [s for s in order if m in seeds[s]]
        row = {"seeds": [int(s) for s in have]}
        for metric in ("val_loss", "fd", "ppl"):
            p = paired([seeds[s][m].get(metric) for s in have], [seeds[s]["qat"].get(metric) for s in have])
            if p and "ratio" in p:
                row[f"{metric}_ratio"], row[f"{metric}_ratio_ci"] = p["ratio"], p["ratio_ci"]
                row[f"{metric}_ratios"] = p["ratios"]
                row[f"{metric}_verdict"] = verdict(p["ratio_ci"])
        row["verdict"] = row.pop("val_loss_verdict", None)
        row["better_on"] = sum(r < 1 for r in row.get("val_loss_ratios", []))
        diags = [seeds[s][m].get("diagnostics") or {} for s in have]
        first = [d["first_target_vs_ptq"] for d in diags if d.get("first_target_vs_ptq") is not None]
        row["first_target_vs_ptq_median"] = float(np.median(first)) if first else None
        jumps = {}
        for d in diags:
            for j in d.get("bit_changes", []):
                if j.get("jump") is not None:
                    jumps.setdefault(f"{j['from_bits']:g}->{j['to_bits']:g}", []).append(j["jump"])
        row["bit_change_jump_median"] = {k: float(np.median(v)) for k, v in jumps.items()}
        largest = [d["bit_change_summary"]["largest_jump"] for d in diags
                   if (d.get("bit_change_summary") or {}).get("largest_jump") is not None]
        if largest:  # a continuous schedule: the median over seeds of its largest one-step jump
            row["largest_jump_median"] = float(np.median(largest))
        out[m] = row
    return out


def _write(out, result):
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)


def _device() -> str:
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
                               capture_output=True, text=True, timeout=120)
        return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def jobs_in_order(cells, smoke):
    """``(cell, seed, compare args)`` in priority order: a cell's seeds before the next cell."""
    for name in cells:
        _, args, methods, wanted = CELLS[name]
        first = FIRST_SEED + (8 if name == "paper_more" else 0)
        if smoke:
            args, methods, wanted = SMOKE_ARGS, SMOKE_METHODS[name], 1
        for k in range(wanted):
            yield name, first + k, list(args) + ["--methods", methods]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=300.0, help="seconds; no job runs past it (default 300)")
    p.add_argument("--out", default="claim_gpu_results.json", help="JSON written after every finished job")
    p.add_argument("--parallel", type=int, default=None, help="comparisons at once (default 12 on a GPU, 2 on a CPU)")
    p.add_argument("--workdir", default=os.path.join("runs", "claim_gpu"), help="comparison folders")
    p.add_argument("--cells", default=None, help=f"comma-separated subset of {','.join(CELLS)} (default: all, in order)")
    p.add_argument("--smoke", action="store_true", help="two cells, one seed, 4 steps: a quick CPU check")
    a = p.parse_args(argv)
    cells = list(SMOKE_CELLS) if a.smoke else list(CELLS)
    if a.cells:
        cells = [c.strip() for c in a.cells.split(",") if c.strip()]
        bad = [c for c in cells if c not in CELLS]
        if bad:
            print(f"claim_gpu: unknown cell {bad[0]!r}; allowed: {', '.join(CELLS)}", file=sys.stderr)
            return 2
    if a.budget <= 0 or (a.parallel is not None and a.parallel < 1):
        print(f"claim_gpu: --budget {a.budget} and --parallel {a.parallel} must be positive", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    deadline = t0 + a.budget
    device = _device()
    parallel = a.parallel or (12 if device.split()[0] in ("gpu", "cuda", "rocm", "tpu") else 2)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.path.abspath(os.path.join(a.workdir, "xla_cache")))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    result = {"device": device, "host": platform.node(), "smoke": a.smoke, "budget_seconds": a.budget,
              "parallel": parallel, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": {}, "unfinished": []}
    for name in cells:
        what, args, methods, wanted = CELLS[name]
        result["cells"][name] = {"what": what, "args": args, "methods": methods.split(","),
                                 "seeds_wanted": wanted, "seeds": {}, "stats": {}}
        if a.smoke:
            result["cells"][name].update(args=SMOKE_ARGS, methods=SMOKE_METHODS[name].split(","), seeds_wanted=1)
    _write(a.out, result)

    pending = list(jobs_in_order(cells, a.smoke))
    running = []  # (proc, cell, seed, workdir, log file)
    while pending or running:
        while pending and len(running) < parallel and deadline - time.monotonic() > 5:
            cell, seed, args = pending.pop(0)
            wd = os.path.join(a.workdir, cell, f"s{seed}")
            os.makedirs(wd, exist_ok=True)
            log = open(os.path.join(wd, "compare.log"), "w")
            cmd = [sys.executable, "-m", "fraqat_jax.compare", "--workdir", wd, "--seeds", "1", "--eval-points", "1",
                   "--set", f"seed={seed}", *args]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True), cell, seed, wd, log))
            print(f"claim_gpu: start {cell} seed {seed}", flush=True)
        if not running:
            break
        time.sleep(0.5)
        out_of_time = time.monotonic() >= deadline
        for job in list(running):
            proc, cell, seed, wd, log = job
            if proc.poll() is None and not out_of_time:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            running.remove(job)
            path = os.path.join(wd, "compare.json")
            if proc.returncode == 0 and os.path.isfile(path):
                c = result["cells"][cell]
                c["seeds"][str(seed)] = seed_rows(path)
                c["stats"] = paired_stats(c["seeds"])
                print(f"claim_gpu: done {cell} seed {seed} ({time.monotonic() - t0:.0f} s)", flush=True)
            else:
                with open(os.path.join(wd, "compare.log")) as f:
                    tail = f.read().splitlines()[-5:]
                result["unfinished"].append({"cell": cell, "seed": seed, "exit": proc.returncode,
                                             "killed_at_budget": out_of_time, "tail": tail})
                print(f"claim_gpu: {cell} seed {seed} exit {proc.returncode}" + (" (budget)" if out_of_time else ""),
                      flush=True)
            result["seconds"] = round(time.monotonic() - t0, 1)
            _write(a.out, result)
        if out_of_time:
            break
    result["unfinished"] += [{"cell": c, "seed": s, "exit": None, "killed_at_budget": True, "tail": []}
                             for c, s, _ in pending] if a.smoke else []
    result["not_started"] = len(pending)
    result["seconds"] = round(time.monotonic() - t0, 1)
    _write(a.out, result)
    done = sum(len(c["seeds"]) for c in result["cells"].values())
    print(f"claim_gpu: wrote {a.out}: {done} seed comparisons finished, {len(pending)} not started, "
          f"{len([u for u in result['unfinished'] if u['exit'] is not None])} cut or failed")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
