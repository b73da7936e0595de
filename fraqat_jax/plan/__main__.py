"""``python -m fraqat_jax.plan``: the command line of :mod:`fraqat_jax.plan` (see there)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fraqat_jax.cli import Parser, error_line

from fraqat_jax.plan.topology import (PlanError, known_topologies, parse_topology, prepare_environment, print_table,
                                      require_libtpu)

__all__ = ["build_parser", "main"]

DESCRIPTION = "compile the real FraQAT train step for a TPU topology that is not here."

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fraqat_jax.plan", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="known topologies: " + ", ".join(known_topologies()))
    p.add_argument("--config", metavar="FILE", help="trainer config file (default: the built-in default run)")
    p.add_argument("--topology", metavar="NAME", required=True, help="e.g. v5e:2x2, v5p:2x2x1, v6e:2x4, or local")
    p.add_argument("--batch-size", type=int, metavar="N", help="global batch (default: the config's)")
    p.add_argument("--mesh", metavar="SPEC", help="e.g. fsdp=-1 or data=2,fsdp=4 (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any trainer config key, and resolution=PIXELS (image size before the VAE)")
    p.add_argument("--mfu", type=float, default=0.4, metavar="F",
                   help="model FLOPs utilisation for the step-time estimate (default 0.4)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON here")
    p.add_argument("--run", type=int, metavar="K", help="with --topology local: run K steps on random inputs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        top = parse_topology(args.topology)
        if args.run is not None and (top.name != "local" or args.run < 1):
            raise PlanError(f"--run {args.run} needs --topology local and K >= 1 (got --topology {top.name})")
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu {args.mfu} is not allowed: use a fraction in (0, 1]")
        require_libtpu(top)
        prepare_environment(top)
        from fraqat_jax.plan.build import plan  # JAX must start after prepare_environment

        report = plan(args.config, top, overrides=args.set, batch_size=args.batch_size, mesh=args.mesh,
                      mfu=args.mfu, run_steps=args.run or 0)
    except PlanError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not report["fits"]:
        print(f"does not fit: {report['oom']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
