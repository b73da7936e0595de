"""``python -m fraqat_jax.eval --workdir DIR``: scores a trained student against its teacher.

Loads the run's teacher and final (or ``--step``) student with ``fraqat_jax.train.load_run``, samples
both from the same noise and writes ``DIR/eval.json`` (see :mod:`fraqat_jax.eval.evaluate` for the
metrics). Bad input (no run in DIR, no checkpoint, a missing Inception weights file, an unwritable
output) exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fraqat_jax.eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run directory written by python -m fraqat_jax.train")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to score (default: the latest)")
    p.add_argument("--ema", action="store_true", help="score the EMA weights (if the run kept them)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per model (default 500)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: the run's sample_steps)")
    p.add_argument("--num-val", type=int, default=512, help="held-out inputs for the validation loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise and validation inputs")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception weights (pytorch-fid .pth, .npz or .safetensors) for image samples")
    p.add_argument("--out", default=None, help="output file (default: WORKDIR/eval.json)")
    return p


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.workdir):
        fail(f"--workdir {args.workdir!r} does not exist")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        fail(f"--inception-weights {args.inception_weights!r} is not a file")
    if args.num_samples < 2 or args.num_val < 1:
        fail(f"--num-samples must be >= 2 and --num-val >= 1, got {args.num_samples} and {args.num_val}")
    out_path = args.out or os.path.join(args.workdir, "eval.json")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        fail(f"cannot write {out_path!r}: {out_dir!r} is not a writable directory")

    from fraqat_jax import train
    from fraqat_jax.eval.evaluate import Evaluator
    from fraqat_jax.nn import bits_of

    try:
        teacher, student, cfg = train.load_run(args.workdir, step=args.step, ema=args.ema)
    except (ValueError, FileNotFoundError) as e:
        fail(f"no trained student in {args.workdir!r}: {e}")
    t0 = time.perf_counter()
    from fraqat_jax.data import DataSourceError

    try:
        ev = Evaluator(teacher, cfg, num_samples=args.num_samples, sample_steps=args.sample_steps,
                       num_val=args.num_val, seed=args.seed, guidance_scale=args.guidance_scale,
                       inception_weights=args.inception_weights)
    except DataSourceError as e:  # the run's data (or --set data=...) cannot be opened here
        fail(str(e))
    result = {"workdir": os.path.abspath(args.workdir), "step": args.step or _latest_step(args.workdir), "schedule": cfg.schedule,
              "bits": _bits(student, bits_of), **ev.evaluate(student), **ev.settings()}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    shown = {k: result[k] for k in ("bits", "val_loss", "fd", "mse", "psnr", "accuracy", "teacher_accuracy") if result.get(k) is not None}
    print(" ".join(f"{k}={v:.6g}" for k, v in shown.items()) + f" -> {out_path}")
    return result


def _latest_step(workdir):
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def _bits(student, bits_of):
    try:
        values = sorted({float(b) for b in bits_of(student).values() if b is not None})
    except Exception:
        return None
    return values[0] if len(values) == 1 else values or None


if __name__ == "__main__":
    main()
