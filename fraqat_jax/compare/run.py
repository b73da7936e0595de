"""The comparison's runs: each method trained and scored on paired seeds, the PTQ baseline, tuning,
the regime-map grid and the diagnostics (see :mod:`fraqat_jax.compare` for the whole design)."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np

from fraqat_jax import schedules, train
from fraqat_jax.compare import stats as compare_stats
from fraqat_jax.eval.evaluate import Evaluator
from fraqat_jax.nn import quantized_layers, set_bits
from fraqat_jax.quant import quantize_codes
from fraqat_jax.runs import StudentReader, checkpoint_steps

METHODS = ("ptq", "qat", "integer", "simple", "fraqat", "linear", "cosine")
SCHEDULE_OF = {"qat": "constant", "integer": "integer", "simple": "simple", "fraqat": "fraqat",
               "linear": "linear", "cosine": "cosine"}
METRICS = ("val_loss", "fd", "mse", "psnr", "accuracy", "ppl")  # ppl: text runs (held-out perplexity)
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


# ----------------------------------------------------------------------------- diagnostics


def code_change_share(before, after, bits: float) -> float:
    """Share of the quantized layers' weights whose ``bits``-bit code differs between two students.

    Each layer is quantized with its own options (symmetry, channel axis, groups) and its own
    dynamic scale, as the forward pass does; layers with full-precision weights are skipped.
    """

    new = dict(quantized_layers(after))
    changed = total = 0
    for path, layer in quantized_layers(before):
        if layer.weight_bits is None:
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


def _evaluator(teacher, cfg, **kwargs):
    """The image :class:`Evaluator`, or for a language model the text one (held-out KL as the
    validation loss, perplexity; no samples, so no FD)."""
    from fraqat_jax.eval.text import TextEvaluator
    from fraqat_jax.family import family_for_model

    text = family_for_model(teacher).evaluation == "text"
    return TextEvaluator(teacher, cfg, **kwargs) if text else Evaluator(teacher, cfg, **kwargs)


def _tune(runner, methods, tune, tune_seeds, num_val, log):
    """``{method: {"key": KEY, "value": best, "scores": {value: mean val loss}}}`` (see module doc)."""

    (key, values), = tune.items()
    ev = _evaluator(runner.teacher, runner.cfg, num_samples=2, num_val=num_val, seed=TUNE_VAL_SEED)
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
    ev = _evaluator(runner.teacher, cfg, num_samples=num_samples, num_val=num_val)
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
            for step in checkpoint_steps(run_dir):
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
