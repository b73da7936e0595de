"""``python -m fraqat_jax.compare``: the paper's comparison (Table 1, Fig. 7) at small scale.

On one teacher, one data source and one budget of optimizer steps, for each of ``--seeds`` seeds:

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

Every trained method uses the trainer (``fraqat_jax.train.run``) with the same config apart from
the schedule and the seed (seed ``s`` of K is ``config.seed + s``, which sets the training noise
and the data order), so methods differ only in how the bit-width comes down. Each run is scored by
:class:`fraqat_jax.eval.evaluate.Evaluator` on the same held-out inputs and sampling noise:
validation loss at ``--eval-points`` checkpoints along the run and at the end, then ``fd``,
``mse``, ``psnr`` and ``accuracy`` of the final student's samples against the teacher's.

Writes to ``--workdir`` (default ``runs/compare``):

- ``compare.json``: one object per method: ``method``, ``schedule``, ``final_bits``, each metric's
  mean over seeds with ``<metric>_std`` (sample standard deviation), ``per_seed`` values, and the
  validation curve (``curve``: ``step``, ``bits``, ``val_loss`` mean and std per point);
- ``compare.md``: the same as a table, with the run's settings;
- ``compare.png``: validation loss against step for each method (mean, and the spread over seeds
  shaded), above the bit-width each schedule trains at (its steps).

Bad input (unknown method, bad config key, a config file that is missing) exits with status 2 and
one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

METHODS = ("ptq", "qat", "integer", "simple", "fraqat", "linear", "cosine")
SCHEDULE_OF = {"qat": "constant", "integer": "integer", "simple": "simple", "fraqat": "fraqat",
               "linear": "linear", "cosine": "cosine"}
METRICS = ("val_loss", "fd", "mse", "psnr", "accuracy")
DEFAULT_WORKDIR = os.path.join("runs", "compare")


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


class _CheckpointReader:
    """Restores the student of each checkpoint of a run, reusing one restore target.

    (``train.load_run`` rebuilds the teacher and the student each call; the comparison reads
    dozens of checkpoints of one structure, so it builds them once.)
    """

    def __init__(self, student, cfg):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from fraqat_jax.train.step import make_optimizer

        self.graph, params_v, self.rest = nnx.split(student, nnx.Param, ...)
        params = nnx.to_pure_dict(params_v)
        tx = make_optimizer(cfg)
        target = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                  "ema": params if cfg.ema_decay > 0 else None, "step": jnp.zeros((), jnp.int32)}
        self.abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)

    def student(self, workdir: str, step: int, keep: int):
        from flax import nnx

        from fraqat_jax.train.checkpoint import Checkpointer

        ckpt = Checkpointer(workdir, keep)
        try:
            state, _ = ckpt.restore(step, self.abstract)
        finally:
            ckpt.close()
        return nnx.merge(self.graph, state["params"], self.rest)


def run_compare(
    cfg,
    *,
    workdir: str = DEFAULT_WORKDIR,
    seeds: int = 3,
    methods=METHODS,
    eval_points: int = 8,
    num_samples: int = 500,
    num_val: int = 512,
    log=print,
) -> list[dict[str, Any]]:
    """Trains and scores every method (see the module docstring); returns the ``compare.json`` list.

    ``cfg``: a trainer config (``fraqat_jax.train.load_config``) holding ``steps``, ``target_bits``
    and the rest; ``schedule`` and ``seed`` are set per run.
    """
    from fraqat_jax import schedules, train
    from fraqat_jax.eval.evaluate import Evaluator
    from fraqat_jax.train.models import set_student_bits

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; allowed: {', '.join(METHODS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if eval_points < 1:
        raise ValueError(f"eval_points must be >= 1, got {eval_points}")
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    steps = int(cfg.steps)
    every = max(1, math.ceil(steps / eval_points))
    base = cfg.to_dict()
    base.update(checkpoint_every=every, keep_checkpoints=eval_points + 2, sample_grids=False,
                log_every=max(1, min(int(base["log_every"]), every)))

    teacher, ptq_student = train.build_models(base)
    set_student_bits(ptq_student, float(cfg.target_bits))
    log(f"compare: scoring setup (teacher samples, {num_val} validation inputs)")
    ev = Evaluator(teacher, cfg, num_samples=num_samples, num_val=num_val)
    reader = _CheckpointReader(ptq_student, train.load_config(base=base))

    results = []
    for method in methods:
        t_method = time.perf_counter()
        if method == "ptq":
            scores = ev.evaluate(ptq_student)
            per_seed = {k: [scores.get(k)] * seeds for k in METRICS}
            curve = {"step": [0, steps], "bits": [float(cfg.target_bits)] * 2,
                     "val_loss": [scores["val_loss"]] * 2, "val_loss_std": [0.0, 0.0]}
            results.append(_summary(method, None, float(cfg.target_bits), per_seed, curve,
                                    time.perf_counter() - t_method))
            log(f"compare: ptq: {_brief(results[-1])}")
            continue
        schedule_name = SCHEDULE_OF[method]
        sched = schedules.by_name(schedule_name, steps, target_bits=float(cfg.target_bits),
                                  start_bits=float(cfg.start_bits))
        bits_table = sched.values(steps)
        per_seed = {k: [] for k in METRICS}
        curves = []
        for s in range(seeds):
            run_cfg = dict(base, schedule=schedule_name, seed=int(cfg.seed) + s)
            run_dir = os.path.join(workdir, method, f"seed_{s}")
            if os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # a fresh run: the comparison never resumes a stale one
            t0 = time.perf_counter()
            result = train.run(run_cfg, workdir=run_dir)
            if result.status != "completed":
                raise RuntimeError(f"{method} seed {s}: training ended with status {result.status!r}")
            t_train = time.perf_counter() - t0
            curve = []
            for step in _checkpoint_steps(run_dir):
                student = reader.student(run_dir, step, eval_points + 2)
                bits = float(bits_table[step - 1])
                set_student_bits(student, bits)
                if step == steps:
                    final = ev.evaluate(student)
                    curve.append((step, bits, final["val_loss"]))
                else:
                    curve.append((step, bits, ev.val_loss(student)))
            for k in METRICS:
                per_seed[k].append(final.get(k))
            curves.append(curve)
            log(f"compare: {method} seed {s}: trained {steps} steps in {t_train:.0f}s, "
                + " ".join(f"{k}={final[k]:.4g}" for k in METRICS if final.get(k) is not None))
        merged = _merge_curves(curves)
        results.append(_summary(method, schedule_name, float(bits_table[-1]), per_seed, merged,
                                time.perf_counter() - t_method))
        log(f"compare: {method}: {_brief(results[-1])}")

    settings = _settings(cfg, seeds, eval_points, ev, time.perf_counter() - t_start)
    write_outputs(results, settings, workdir)
    return results


def _merge_curves(curves):
    steps = sorted(set.intersection(*(set(s for s, _, _ in c) for c in curves)))
    table = [{s: (b, v) for s, b, v in c} for c in curves]
    vals = np.array([[t[s][1] for s in steps] for t in table])
    return {"step": steps, "bits": [table[0][s][0] for s in steps], "val_loss": vals.mean(0).tolist(),
            "val_loss_std": (vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))).tolist()}


def _summary(method, schedule, final_bits, per_seed, curve, seconds):
    out: dict[str, Any] = {"method": method, "schedule": schedule, "final_bits": final_bits}
    for k in METRICS:
        mean, std = _mean_std(per_seed[k])
        if mean is not None:
            out[k], out[f"{k}_std"] = mean, std
    out["per_seed"] = {k: v for k, v in per_seed.items() if any(x is not None for x in v)}
    out["curve"] = curve
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
        **ev.settings(), "seconds": round(seconds, 1),
    }


def _fmt(row, k, digits=4):
    if k not in row:
        return "–"
    return f"{row[k]:.{digits}g} ± {row[k + '_std']:.2g}"


def markdown(results, settings) -> str:
    qat = next((r for r in results if r["method"] == "qat"), None)
    lines = [
        f"Teacher-student comparison at W{settings['target_bits']:g}A{settings['act_bits']:g}: "
        f"{settings['steps']} steps, {settings['seeds']} seeds ({', '.join(map(str, settings['seed_values']))}), "
        f"mean ± standard deviation over seeds.",
        "",
        "| method | final bits | val loss | FD | MSE | PSNR (dB) | accuracy | val loss vs QAT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = "–"
        if qat is not None and r is not qat:
            rel = f"{100 * (r['val_loss'] / qat['val_loss'] - 1):+.1f}%"
        lines.append(
            f"| {r['method']} | {r['final_bits']:g} | {_fmt(r, 'val_loss', 3)} | {_fmt(r, 'fd', 3)} | "
            f"{_fmt(r, 'mse', 3)} | {_fmt(r, 'psnr', 4)} | {_fmt(r, 'accuracy', 3)} | {rel} |"
        )
    ta = settings.get("teacher_accuracy")
    lines += [
        "",
        f"Settings: teacher `{settings['teacher']}`, data `{settings['data']}`, batch {settings['batch_size']}, "
        f"lr {settings['lr']:g} ({settings['lr_schedule']}, {settings['warmup_steps']} warmup), linear/cosine "
        f"from {settings['start_bits']:g} bits. Val loss: teacher-student MSE on {settings['num_val']} held-out "
        f"inputs. Samples: {settings['num_samples']} per model, {settings['sampler']} with "
        f"{settings['sample_steps']} steps, the same noise for teacher and students; FD on "
        f"{settings['fd_features']} features against the teacher's samples; MSE/PSNR image for image; "
        f"accuracy: the digits classifier on the student's class-conditional samples"
        + (f" (teacher: {ta:.3f})" if ta is not None else "")
        + f". Total time {settings['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot(results, settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axb) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        c = r["curve"]
        color = colors[i % len(colors)]
        steps, mean, std = np.array(c["step"]), np.array(c["val_loss"]), np.array(c["val_loss_std"])
        if r["method"] == "ptq":
            ax.axhline(mean[0], color=color, ls="--", lw=1, label="ptq (no training)")
            continue
        ax.plot(steps, mean, marker="o", ms=3, color=color, label=r["method"])
        ax.fill_between(steps, np.maximum(mean - std, mean * 0.05), mean + std, color=color, alpha=0.15)
        from fraqat_jax import schedules

        sched = schedules.by_name(r["schedule"], settings["steps"], target_bits=settings["target_bits"],
                                  start_bits=settings["start_bits"])
        b = sched.values(settings["steps"])
        axb.step(np.arange(1, len(b) + 1), b, where="post", color=color, lw=1.2)
        for s in np.nonzero(np.diff(b))[0] + 1:
            if r["method"] == "fraqat":
                ax.axvline(s, color=color, lw=0.5, ls=":", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("validation loss (teacher-student MSE)")
    ax.set_title(f"W{settings['target_bits']:g}A{settings['act_bits']:g}, {settings['steps']} steps, "
                 f"{settings['seeds']} seeds (mean, ±1 std shaded; dotted: FraQAT bit changes)")
    ax.legend(fontsize=8, ncol=2)
    axb.set_ylabel("weight bits")
    axb.set_xlabel("optimizer step")
    axb.set_ylim(max(2.0, settings["target_bits"] - 0.5), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results, settings, workdir: str) -> None:
    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "compare_settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(markdown(results, settings))
    plot(results, settings, os.path.join(workdir, "compare.png"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fraqat_jax.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="trainer config file (a Python file with get_config())")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"output directory (default {DEFAULT_WORKDIR})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--target-bits", type=float, default=None, help="final weight bits (default: the config's, 4)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--eval-points", type=int, default=8, help="validation-loss checkpoints per run (default 8)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per model for FD/MSE/accuracy")
    p.add_argument("--num-val", type=int, default=512, help="held-out validation inputs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any trainer config key")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fraqat_jax import train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.target_bits is not None:
        overrides.append(f"target_bits={args.target_bits}")
    overrides.append("progress=none")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        cfg = train.load_config(args.config, overrides)
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; allowed: {', '.join(METHODS)}")
        for name, v, low in (("--seeds", args.seeds, 1), ("--eval-points", args.eval_points, 1),
                             ("--num-samples", args.num_samples, 2), ("--num-val", args.num_val, 1)):
            if v < low:
                raise ValueError(f"{name}={v} is not allowed: use an integer >= {low}")
        os.makedirs(args.workdir, exist_ok=True)
        if not os.access(args.workdir, os.W_OK):
            raise ValueError(f"--workdir {args.workdir!r} is not writable")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    results = run_compare(cfg, workdir=args.workdir, seeds=args.seeds, methods=methods,
                          eval_points=args.eval_points, num_samples=args.num_samples, num_val=args.num_val,
                          log=lambda m: print(m, flush=True))
    with open(os.path.join(args.workdir, "compare.md")) as f:
        print(f.read())
    print(f"wrote {os.path.join(args.workdir, 'compare.json')}, compare.md, compare.png")
    return results


if __name__ == "__main__":
    main()
