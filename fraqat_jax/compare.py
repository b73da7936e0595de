"""``python -m fraqat_jax.compare``: the paper's comparison (Table 1, Fig. 7) at small scale, paired.

On one teacher, one data source and one budget of optimizer steps, for each of ``--seeds`` seeds
(default 5):

========  ==============================================================================
method    what it is
========  ==============================================================================
ptq       dynamic post-training quantization at W(B)A8: the teacher's weights, no training
qat       vanilla QAT: constant B bits for the whole run (trainer schedule ``constant``)
integer   the paper's integer staircase 8, 7, 6, 5, 4 (ending at B)
simple    the paper's 16, 8, 4 staircase (ending at B)
fraqat    FraQAT: 8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4 (ending at B)
linear    bits falling linearly from ``start_bits`` to B (beyond the paper)
cosine    bits falling along a half cosine from ``start_bits`` to B (beyond the paper)
========  ==============================================================================

(Any other schedule name of :data:`fraqat_jax.schedules.NAMES` that the trainer accepts is a
method too, named as the schedule.)

**Paired seeds.** Every trained method uses the trainer (``fraqat_jax.train.run``) with the same
config apart from the schedule and the seed; seed ``k`` of K is ``config.seed + k``. The trainer
draws the data order from the seed (``fraqat_jax.data``: one permutation per epoch of
``(seed, epoch)``) and the diffusion noise and timesteps of step ``i`` from
``fold_in(key(seed), i)``, so at seed ``k`` every method sees exactly the same batches, noise and
timesteps, and differs only in how the bit-width comes down. Results are therefore compared per
seed against vanilla QAT: ratios ``method / qat`` per seed, their mean, and a 95% **paired
Student-t** confidence interval (``scipy.stats.t``; see :mod:`fraqat_jax.compare_stats`). Only the
CI decides: ``better`` if it lies below 1, ``worse`` above, else a ``tie``.

Each run is scored by :class:`fraqat_jax.eval.evaluate.Evaluator` on the same held-out inputs and
sampling noise: validation loss at ``--eval-points`` checkpoints and at the end, then ``fd``,
``mse``, ``psnr`` and ``accuracy`` of the final student's samples against the teacher's.
Diagnostics per run (``diagnostics`` in ``compare.json``): the training loss at the first step at
the target bits against PTQ's validation loss, the loss jump at each change of bits (last loss of
the old width -> first of the new) and the share of quantized weights whose target-bit code differs
from the teacher's (PTQ's) at the end.

``--tune KEY=V1,V2,...`` (e.g. ``lr=1e-4,3e-4,1e-3``) first picks, per method, the value with the
lowest mean validation loss on ``--tune-seeds`` seeds (``config.seed + 1000 + k``) scored on a
separate set of validation inputs, then reports on the fresh seeds ``config.seed + k`` as above.

``--grid KEY=V1,V2,...`` (repeatable, any trainer config key) runs the whole comparison at every
combination of values, in ``workdir/<key=value,...>/``, and writes ``grid.json`` (every cell's
paired ratios and CIs) and ``grid.png`` (heatmap of the FraQAT / QAT ratio, CI in each cell).

Writes to ``--workdir`` (default ``runs/compare``):

- ``compare.json``: one object per method: ``method``, ``schedule``, ``final_bits``, ``seeds``
  (the seed values), each metric's mean over seeds with ``<metric>_std``, ``per_seed`` values,
  ``val_loss_ratio`` / ``fd_ratio`` (mean of the per-seed ratios to vanilla QAT) with
  ``val_loss_ratio_ci`` / ``fd_ratio_ci`` (``[low, high]``, 95%), per-seed ``val_loss_ratios``,
  differences ``val_loss_diff`` (+ ``_ci``), ``verdict``, ``diagnostics`` and the validation curve;
- ``compare.md``: the same as a table, with the run's settings; ``compare.png``: the curves;
- ``xla_cache/``: JAX's persistent compilation cache (unless ``JAX_COMPILATION_CACHE_DIR`` or
  ``jax_compilation_cache_dir`` names another), so seeds after the first reuse the compiled step.

Bad input (unknown method, bad config key, a config file that is missing, a bad ``--grid`` or
``--tune``) exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from fraqat_jax import compare_stats, schedules, train
from fraqat_jax.compare_stats import markdown, plot, write_outputs  # noqa: F401  (public here too)
from fraqat_jax.eval.evaluate import Evaluator
from fraqat_jax.nn import quantized_layers, set_bits
from fraqat_jax.quant import quantize_codes
from fraqat_jax.train.restore import StudentReader

METHODS = ("ptq", "qat", "integer", "simple", "fraqat", "linear", "cosine")
SCHEDULE_OF = {"qat": "constant", "integer": "integer", "simple": "simple", "fraqat": "fraqat",
               "linear": "linear", "cosine": "cosine"}
METRICS = ("val_loss", "fd", "mse", "psnr", "accuracy")
DEFAULT_WORKDIR = os.path.join("runs", "compare")
DEFAULT_SEEDS = 5
TUNE_SEED_OFFSET = 1000  # tuning seeds never overlap the reported ones
TUNE_VAL_SEED = 1  # tuning scores on other validation inputs than the report (Evaluator seed 0)


def schedule_of(method: str) -> str:
    """The trainer schedule of a trained method (``qat`` -> ``constant``, else the same name)."""

    if method in SCHEDULE_OF:
        return SCHEDULE_OF[method]
    if method not in ("ptq", "constant"):
        try:
            schedules.parse_name(method)
            return method
        except ValueError:
            pass
    allowed = list(METHODS) + [n for n in schedules.NAMES if n not in METHODS and n != "constant"]
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(allowed)}, linear:F, cosine:F")


def _mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    arr = np.asarray(vals, np.float64)
    if len(arr) == 1 or np.all(arr == arr[0]):
        return float(arr[0]), 0.0
    return float(arr.mean()), float(arr.std(ddof=1))


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# ----------------------------------------------------------------------------- diagnostics


def code_change_share(before, after, bits: float) -> float:
    """Share of the quantized layers' weights whose ``bits``-bit code differs between two students.

    Each layer is quantized with its own options (symmetry, channel axis, groups) and its own
    dynamic scale, as the forward pass does; layers with full-precision weights are skipped.
    """

    new = dict(quantized_layers(after))
    changed = total = 0
    for path, layer in quantized_layers(before):
        if layer.bits is None:
            continue
        opts = {"symmetric": layer.weight_symmetric, "channel_axis": layer.channel_axis, "group_size": layer.group_size}
        a = np.asarray(quantize_codes(layer.kernel[...], bits, **opts)[0])
        b = np.asarray(quantize_codes(new[path].kernel[...], bits, **opts)[0])
        changed += int(np.count_nonzero(a != b))
        total += a.size
    return changed / total if total else 0.0


def run_diagnostics(run_dir: str, ptq_val_loss: float, target_bits: float) -> dict[str, Any]:
    """Loss at the first step at ``target_bits`` (vs PTQ) and the jump at each change of bits,
    from the run's ``metrics.jsonl`` (the comparison logs every step)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r and "bits" in r]
    out: dict[str, Any] = {"ptq_val_loss": ptq_val_loss, "bit_changes": []}
    first = next((r for r in rows if abs(r["bits"] - target_bits) < 1e-6), None)
    if first is not None:
        out.update(first_target_step=first["step"], first_target_loss=first["loss"],
                   first_target_vs_ptq=first["loss"] / ptq_val_loss if ptq_val_loss else None)
    for prev, cur in itertools.pairwise(rows):
        if cur["bits"] != prev["bits"] and cur["step"] == prev["step"] + 1:
            out["bit_changes"].append({"step": cur["step"], "from_bits": prev["bits"], "to_bits": cur["bits"],
                                       "loss_before": prev["loss"], "loss_after": cur["loss"],
                                       "jump": cur["loss"] / prev["loss"] if prev["loss"] else None})
    return out


# ----------------------------------------------------------------------------- one comparison


class _Runner:
    """Trains one method at one seed and scores it (shared state of one comparison)."""

    def __init__(self, cfg, workdir, eval_points, log):
        self.cfg, self.workdir, self.log = cfg, workdir, log
        self.steps = int(cfg.steps)
        self.every = max(1, math.ceil(self.steps / eval_points))
        self.keep = eval_points + 2
        self.base = cfg.to_dict()
        # Every step logged: the diagnostics read the loss at each change of bits.
        self.base.update(checkpoint_every=self.every, keep_checkpoints=self.keep, sample_grids=False, log_every=1)
        self.teacher, self.ptq_student = train.build_models(self.base)

        set_bits(self.ptq_student, float(cfg.target_bits))
        self.reader = StudentReader(self.ptq_student, train.load_config(base=self.base))

    def train(self, method: str, seed: int, run_dir: str, overrides=None, final_only: bool = False):
        run_cfg = dict(self.base, schedule=schedule_of(method), seed=seed, **(overrides or {}))
        if final_only:
            run_cfg["checkpoint_every"] = self.steps
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a fresh run: the comparison never resumes a stale one
        t0 = time.perf_counter()
        result = train.run(run_cfg, workdir=run_dir)
        if result.status != "completed":
            raise RuntimeError(f"{method} seed {seed}: training ended with status {result.status!r}")
        return time.perf_counter() - t0

    def student(self, run_dir: str, step: int, bits: float):
        student = self.reader.student(run_dir, step, keep=self.keep)
        set_bits(student, bits)
        return student


def _tune(runner, methods, tune, tune_seeds, num_val, log):
    """``{method: {"key": KEY, "value": best, "scores": {value: mean val loss}}}`` (see module doc)."""

    (key, values), = tune.items()
    ev = Evaluator(runner.teacher, runner.cfg, num_samples=2, num_val=num_val, seed=TUNE_VAL_SEED)
    out = {}
    for method in methods:
        if method == "ptq":
            continue
        scores = {}
        for value in values:
            losses = []
            for s in range(tune_seeds):
                seed = int(runner.cfg.seed) + TUNE_SEED_OFFSET + s
                run_dir = os.path.join(runner.workdir, "tune", method, f"{key}={value}", f"seed_{s}")
                runner.train(method, seed, run_dir, {key: value}, final_only=True)
                student = runner.student(run_dir, runner.steps, float(runner.cfg.target_bits))
                losses.append(ev.val_loss(student))
            scores[str(value)] = float(np.mean(losses))
            log(f"compare: tune {method} {key}={value}: val_loss={scores[str(value)]:.4g}")
        best = min(scores, key=scores.get)
        out[method] = {"key": key, "value": values[[str(v) for v in values].index(best)], "scores": scores}
    return out


def run_compare(
    cfg,
    *,
    workdir: str = DEFAULT_WORKDIR,
    seeds: int = DEFAULT_SEEDS,
    methods=METHODS,
    eval_points: int = 8,
    num_samples: int = 500,
    num_val: int = 512,
    tune: dict | None = None,
    tune_seeds: int = 2,
    log=print,
) -> list[dict[str, Any]]:
    """Trains and scores every method (see the module docstring); returns the ``compare.json`` list.

    ``cfg``: a trainer config (``fraqat_jax.train.load_config``) holding ``steps``, ``target_bits``
    and the rest; ``schedule`` and ``seed`` are set per run. ``tune``: ``{KEY: [values]}`` (one
    key) to pick per method on ``tune_seeds`` separate seeds, or None.
    """

    for m in methods:
        if m != "ptq":
            schedule_of(m)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if eval_points < 1:
        raise ValueError(f"eval_points must be >= 1, got {eval_points}")
    if tune is not None and len(tune) != 1:
        raise ValueError(f"--tune takes one KEY=V1,V2,... , got {len(tune)} keys")
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    runner = _Runner(cfg, workdir, eval_points, log)
    target, steps = float(cfg.target_bits), runner.steps
    tuned = _tune(runner, methods, tune, tune_seeds, num_val, log) if tune else {}
    log(f"compare: scoring setup (teacher samples, {num_val} validation inputs)")
    ev = Evaluator(runner.teacher, cfg, num_samples=num_samples, num_val=num_val)
    ptq_scores = ev.evaluate(runner.ptq_student)
    seed_values = [int(cfg.seed) + s for s in range(seeds)]

    results = []
    for method in methods:
        t_method = time.perf_counter()
        if method == "ptq":
            per_seed = {k: [ptq_scores.get(k)] * seeds for k in METRICS}
            curve = {"step": [0, steps], "bits": [target] * 2,
                     "val_loss": [ptq_scores["val_loss"]] * 2, "val_loss_std": [0.0, 0.0]}
            results.append(_summary(method, None, target, seed_values, per_seed, curve, [],
                                    time.perf_counter() - t_method))
            log(f"compare: ptq: {_brief(results[-1])}")
            continue

        sched = schedules.by_name(schedule_of(method), steps, target_bits=target, start_bits=float(cfg.start_bits))
        bits_table = sched.values(steps)
        overrides = {tuned[method]["key"]: tuned[method]["value"]} if method in tuned else None
        per_seed = {k: [] for k in METRICS}
        curves, diagnostics = [], []
        for s, seed in enumerate(seed_values):
            run_dir = os.path.join(workdir, method, f"seed_{s}")
            t_train = runner.train(method, seed, run_dir, overrides)
            curve = []
            for step in _checkpoint_steps(run_dir):
                bits = float(bits_table[step - 1])
                student = runner.student(run_dir, step, bits)
                if step == steps:
                    final = ev.evaluate(student)
                    curve.append((step, bits, final["val_loss"]))
                else:
                    curve.append((step, bits, ev.val_loss(student)))
            diag = run_diagnostics(run_dir, ptq_scores["val_loss"], float(bits_table[-1]))
            diag["codes_changed"] = code_change_share(runner.ptq_student, student, float(bits_table[-1]))
            diagnostics.append(diag)
            for k in METRICS:
                per_seed[k].append(final.get(k))
            curves.append(curve)
            log(f"compare: {method} seed {s}: trained {steps} steps in {t_train:.0f}s, "
                + " ".join(f"{k}={final[k]:.4g}" for k in METRICS if final.get(k) is not None))
        row = _summary(method, schedule_of(method), float(bits_table[-1]), seed_values, per_seed,
                       _merge_curves(curves), diagnostics, time.perf_counter() - t_method)
        if method in tuned:
            row["tuned"] = tuned[method]
        results.append(row)
        log(f"compare: {method}: {_brief(results[-1])}")

    compare_stats.add_paired(results, "qat")
    settings = _settings(cfg, seeds, eval_points, ev, time.perf_counter() - t_start)
    if tune:
        settings["tune"] = {"values": {k: list(map(str, v)) for k, v in tune.items()}, "seeds": tune_seeds,
                            "seed_values": [int(cfg.seed) + TUNE_SEED_OFFSET + s for s in range(tune_seeds)]}
    compare_stats.write_outputs(results, settings, workdir)
    return results


def _merge_curves(curves):
    steps = sorted(set.intersection(*({s for s, _, _ in c} for c in curves)))
    table = [{s: (b, v) for s, b, v in c} for c in curves]
    vals = np.array([[t[s][1] for s in steps] for t in table])
    return {"step": steps, "bits": [table[0][s][0] for s in steps], "val_loss": vals.mean(0).tolist(),
            "val_loss_std": (vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))).tolist()}


def _summary(method, schedule, final_bits, seed_values, per_seed, curve, diagnostics, seconds):
    out: dict[str, Any] = {"method": method, "schedule": schedule, "final_bits": final_bits,
                           "seeds": list(seed_values)}
    for k in METRICS:
        mean, std = _mean_std(per_seed[k])
        if mean is not None:
            out[k], out[f"{k}_std"] = mean, std
    out["per_seed"] = {k: v for k, v in per_seed.items() if any(x is not None for x in v)}
    out["curve"] = curve
    out["diagnostics"] = diagnostics
    out["seconds"] = round(seconds, 1)
    return out


def _brief(row):
    return " ".join(f"{k}={row[k]:.4g}±{row[k + '_std']:.2g}" for k in METRICS if k in row)


def _settings(cfg, seeds, eval_points, ev, seconds):
    return {
        "steps": int(cfg.steps), "seeds": seeds, "seed_values": [int(cfg.seed) + s for s in range(seeds)],
        "target_bits": float(cfg.target_bits), "act_bits": float(cfg.act_bits), "teacher": cfg.teacher,
        "data": cfg.data, "batch_size": int(cfg.batch_size), "lr": float(cfg.lr), "lr_schedule": cfg.lr_schedule,
        "warmup_steps": int(cfg.warmup_steps), "start_bits": float(cfg.start_bits), "eval_points": eval_points,
        "statistics": "per-seed ratio to vanilla QAT (paired seeds), mean with 95% Student-t CI",
        **ev.settings(), "seconds": round(seconds, 1),
    }


def run_grid(load, axes: dict[str, list[str]], *, workdir: str, log=print, **kwargs) -> dict[str, Any]:
    """Runs :func:`run_compare` at every point of ``axes`` (``load(overrides) -> config``), writes
    ``grid.json`` and ``grid.png`` to ``workdir`` and returns the grid object."""
    grid = {"axes": axes, "cells": [],
            "statistics": "per cell and method: mean of per-seed ratios to vanilla QAT, 95% paired-t CI"}
    points = compare_stats.grid_points(axes)
    for i, point in enumerate(points):
        cell_dir = os.path.join(workdir, compare_stats.point_name(point))
        log(f"compare: grid point {i + 1}/{len(points)}: {point}")
        results = run_compare(load([f"{k}={v}" for k, v in point.items()]), workdir=cell_dir, log=log, **kwargs)
        grid["cells"].append(compare_stats.cell(point, results, cell_dir))
        with open(os.path.join(workdir, "grid.json"), "w") as f:  # after every cell: a partial map survives
            json.dump(grid, f, indent=1)
    # The heatmap shows FraQAT's ratio; without it, the first other trained method's (else PTQ's).
    others = [m for m in kwargs.get("methods", METHODS) if m != "qat"]
    if others:
        method = "fraqat" if "fraqat" in others else next((m for m in others if m != "ptq"), others[0])
        compare_stats.plot_grid(grid, os.path.join(workdir, "grid.png"), method)
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fraqat_jax.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="trainer config file (a Python file with get_config())")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"output directory (default {DEFAULT_WORKDIR})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"paired seeds per method (default {DEFAULT_SEEDS})")
    p.add_argument("--target-bits", type=float, default=None, help="final weight bits (default: the config's, 4)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--eval-points", type=int, default=8, help="validation-loss checkpoints per run (default 8)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per model for FD/MSE/accuracy")
    p.add_argument("--num-val", type=int, default=512, help="held-out validation inputs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any trainer config key")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the comparison at every value (repeatable: every combination); writes grid.json/png")
    p.add_argument("--tune", default=None, metavar="KEY=V1,V2,...",
                   help="pick each method's value (e.g. lr=1e-4,3e-4,1e-3) on separate seeds, report on fresh ones")
    p.add_argument("--tune-seeds", type=int, default=2, help="seeds per value when tuning (default 2)")
    return p


def _check_args(args, methods, overrides):
    cfg = train.load_config(args.config, overrides)
    for m in methods:
        if m != "ptq":
            schedule_of(m)
    for name, v, low in (("--seeds", args.seeds, 1), ("--eval-points", args.eval_points, 1),
                         ("--num-samples", args.num_samples, 2), ("--num-val", args.num_val, 1),
                         ("--tune-seeds", args.tune_seeds, 1)):
        if v < low:
            raise ValueError(f"{name}={v} is not allowed: use an integer >= {low}")
    axes = compare_stats.parse_grid(args.grid)
    tune = compare_stats.parse_grid([args.tune]) if args.tune else None
    if tune and set(tune) & set(axes):
        raise ValueError(f"--tune key {next(iter(tune))!r} is also a --grid axis")
    for point in compare_stats.grid_points(axes) if axes else []:  # every grid value must load
        train.load_config(args.config, overrides + [f"{k}={v}" for k, v in point.items()])
    for key, values in (tune or {}).items():  # typed values; a bad one raises ConfigError here
        tune = {key: [train.load_config(args.config, overrides + [f"{key}={v}"])[key] for v in values]}
    os.makedirs(args.workdir, exist_ok=True)
    if not os.access(args.workdir, os.W_OK):
        raise ValueError(f"--workdir {args.workdir!r} is not writable")
    return cfg, axes, tune


def main(argv=None):
    args = build_parser().parse_args(argv)

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.target_bits is not None:
        overrides.append(f"target_bits={args.target_bits}")
    overrides.append("progress=none")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        cfg, axes, tune = _check_args(args, methods, overrides)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if jax.config.jax_compilation_cache_dir is None:
        # Runs that differ only in seed compile the same programs: JAX's persistent cache compiles once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
    kwargs = {"seeds": args.seeds, "methods": methods, "eval_points": args.eval_points,
              "num_samples": args.num_samples, "num_val": args.num_val, "tune": tune, "tune_seeds": args.tune_seeds}

    def log(message):
        print(message, flush=True)

    if axes:
        grid = run_grid(lambda extra: train.load_config(args.config, overrides + extra), axes,
                        workdir=args.workdir, log=log, **kwargs)
        print(f"wrote {os.path.join(args.workdir, 'grid.json')}, grid.png")
        return grid
    results = run_compare(cfg, workdir=args.workdir, log=log, **kwargs)
    with open(os.path.join(args.workdir, "compare.md")) as f:
        print(f.read())
    print(f"wrote {os.path.join(args.workdir, 'compare.json')}, compare.md, compare.png")
    return results


if __name__ == "__main__":
    main()
