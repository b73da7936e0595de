"""``python -m fraqat_jax.train``: FraQAT distillation from the command line (see ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys

from fraqat_jax import schedules
from fraqat_jax.cli import Parser, error_line


def _epilog() -> str:
    from fraqat_jax.recipe.config import get_config, help_for

    cfg = get_config()
    lines = ["config keys of the default run for --set KEY=VALUE (default, meaning); a run whose teacher is of "
             "another model family takes that family's keys instead of the last ones listed:"]
    for k, h in help_for().items():
        lines.append(f"  {k} = {cfg[k]!r}\n      {h}")
    lines.append("\nMulti-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run where "
                 "jax.distributed.initialize() detects the cluster: TPU pods, SLURM, ...).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fraqat_jax.train",
                description="Distil a full-precision transformer (a diffusion or a language model) into a W4A8 "
                            "student with the "
                            "FraQAT fractional bit-width schedule. No arguments: the built-in digits DiT.",
                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="Python config file defining get_config()")
    p.add_argument("--workdir", metavar="DIR", default=os.path.join("runs", "default"),
                   help="outputs and checkpoints; an existing checkpoint there is resumed (default: runs/default)")
    p.add_argument("--steps", type=int, metavar="N", help="total optimizer updates (schedule scaled to them)")
    p.add_argument("--schedule", metavar="NAME", help=" | ".join(schedules.NAMES))
    p.add_argument("--mesh", metavar="SPEC", help="e.g. data=4,fsdp=2,tensor=1 (product = device count)")
    p.add_argument("--log-every", type=int, metavar="K", help="metrics row every K updates")
    p.add_argument("--seed", type=int, metavar="S", help="random seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (see below)")
    p.add_argument("--force-resume", action="store_true",
                   help="resume the workdir's checkpoint even if its config differs (recorded in metrics.jsonl); "
                        "without it a resume with another config exits 2 naming each differing key")
    return p


def _distributed_init() -> None:
    """``jax.distributed.initialize`` when the environment describes several processes."""
    import jax

    # CPU processes exchange collectives through gloo (no effect on GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
        pid = int(os.environ.get("JAX_PROCESS_ID", "0"))
        if n > 1:
            jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    elif os.environ.get("FRAQAT_DISTRIBUTED", "") == "auto":
        jax.distributed.initialize()


def _compilation_cache() -> None:
    """XLA's persistent compilation cache, so a rerun (or a resume) skips recompiling the step.

    ``$JAX_COMPILATION_CACHE_DIR`` wins; ``FRAQAT_COMPILATION_CACHE=0`` turns it off."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("FRAQAT_COMPILATION_CACHE") == "0":
        return
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fraqat_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache)


def main(argv=None) -> int:
    _distributed_init()  # before anything touches a JAX backend (importing fraqat_jax may)
    args = build_parser().parse_args(argv)
    from fraqat_jax.recipe.config import ConfigError, load_config

    overrides = list(args.set)
    for flag, key in (("steps", "steps"), ("schedule", "schedule"), ("mesh", "mesh"), ("log_every", "log_every"),
                      ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    _compilation_cache()
    from fraqat_jax.data import DataSourceError
    from fraqat_jax.models import CheckpointFileError
    from fraqat_jax.train.loop import CheckpointWriteError, TrainingDiverged, run

    try:
        result = run(cfg, workdir=args.workdir, force_resume=args.force_resume)
    except (ConfigError, DataSourceError, CheckpointFileError) as e:  # bad input: one line, exit 2
        print(error_line(e), file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointWriteError) as e:
        print(error_line(e), file=sys.stderr)
        return 1
    import jax

    if jax.process_index() == 0:
        _print_summary(result)
    if result.status == "preempted":
        return 143
    return 0


def _print_summary(r) -> None:
    w = r.workdir
    print(f"\nFraQAT run {r.status}: {r.steps} updates in {r.seconds:.0f}s, final bits {r.final_bits:g}, "
          f"final loss {r.final_loss:.4g}, train-step compilations {r.compilations}")
    print(f"outputs in {w}:")
    for name, what in (("metrics.jsonl", "per-step metrics"), ("samples", "teacher and student samples at each change of bits (the family's: PNG grids, text files)"),
                       ("tb", "TensorBoard events (tensorboard --logdir " + os.path.join(w, "tb") + ")"),
                       ("checkpoints", "orbax checkpoints (resume: run the same command again)"),
                       ("summary.json", "this summary")):
        print(f"  {os.path.join(w, name)}  {what}")


if __name__ == "__main__":
    sys.exit(main())
