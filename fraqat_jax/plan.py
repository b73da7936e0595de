"""``python -m fraqat_jax.plan``: compile the real FraQAT train step for a TPU topology that is not here.

::

    python -m fraqat_jax.plan --config FILE --topology NAME [--batch-size N] [--mesh SPEC]
                              [--set KEY=VALUE ...] [--mfu F] [--json PATH] [--run K]

It builds what ``python -m fraqat_jax.train`` runs for the config (frozen teacher, quantized student,
AdamW state, mesh and shardings, the same jitted step) from shapes alone (no weights, no data) and
compiles it ahead of time with libtpu for ``NAME`` (``v5e:2x2``, ``v5p:2x2x1``, ``v6e:2x4``, ...;
see :data:`GENERATIONS`), the way MaxText's ``train_compile.py`` does. ``local`` compiles for this
machine's devices instead, and ``--run K`` then runs K steps on random inputs.

Input shapes: ``--set resolution=PIXELS`` gives the latent size through the family's VAE factor
(8, Sana's DC-AE 32; pixel data such as the built-in digits: 1); text lengths are the diffusers
pipelines' defaults (:data:`TEXT_TOKENS`). Without ``resolution`` the teacher's ``sample_size`` is
used, as the trainer does.

Exit status: 0 compiled and fits; 1 does not fit (the compiler's RESOURCE_EXHAUSTED); 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fraqat_jax.plan_topology import (GENERATIONS, PlanError, Topology, prepare_environment, input_spec,
                                      known_topologies, parse_topology, print_table, require_libtpu)

__all__ = ["GENERATIONS", "PlanError", "Topology", "input_spec", "main", "parse_topology", "plan"]

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fraqat_jax.plan", description=__doc__.split("\n\n")[0],
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
        report = plan(args.config, top, overrides=args.set, batch_size=args.batch_size, mesh=args.mesh,
                      mfu=args.mfu, run_steps=args.run or 0)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
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


def plan(*args, **kwargs):
    """See :func:`fraqat_jax.plan_build.plan` (imported lazily: JAX must start after the environment)."""
    from fraqat_jax.plan_build import plan as _plan

    return _plan(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
