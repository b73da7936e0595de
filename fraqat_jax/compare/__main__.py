"""``python -m fraqat_jax.compare``: the command line of :mod:`fraqat_jax.compare` (see there)."""

from __future__ import annotations

import argparse
import os

import jax

from fraqat_jax import train
from fraqat_jax.cli import Parser, fail
from fraqat_jax.compare import stats as compare_stats
from fraqat_jax.compare.run import DEFAULT_SEEDS, DEFAULT_WORKDIR, METHODS, run_compare, run_grid, schedule_of

DESCRIPTION = "the paper's comparison (Table 1, Fig. 7) at small scale, paired."


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fraqat_jax.compare", description=DESCRIPTION)
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
        fail(e)
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
