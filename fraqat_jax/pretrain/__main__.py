"""``python -m fraqat_jax.pretrain``: the command line of :mod:`fraqat_jax.pretrain` (see there)."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files

from fraqat_jax.cli import Parser, error_line
from fraqat_jax.pretrain import teachers
from fraqat_jax.pretrain.teachers import SIZES, pretrain
from fraqat_jax.diffusion.teachers import BUILTIN_TEACHERS, save_builtin_teacher


def main(argv=None) -> int:
    parser = Parser(prog="python -m fraqat_jax.pretrain", description=teachers.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="s", help="s (builtin, default), m (builtin:m, ~10x larger) or sana "
                        "(builtin:sana, the text-to-image pipeline: python -m fraqat_jax.pretrain.sana, with its "
                        "defaults and --seed / --out)")
    parser.add_argument("--steps", type=int, default=None, help="default 6000 (s) / 4000 (m)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 (s) / 5e-4 (m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output directory (default: the package's assets)")
    args = parser.parse_args(argv)
    if args.size == "sana":
        from fraqat_jax.pretrain import sana

        return sana.main(["--seed", str(args.seed)] + (["--out", args.out] if args.out else []))
    if args.size not in SIZES:
        print(error_line(f"--size {args.size!r} is not allowed: choose one of {', '.join([*SIZES, 'sana'])}"), file=sys.stderr)
        return 2
    config, name, default_steps, default_lr = SIZES[args.size]
    args.steps = default_steps if args.steps is None else args.steps
    args.lr = default_lr if args.lr is None else args.lr
    if args.steps < 1 or args.batch_size < 1:
        print(error_line(f"--steps and --batch-size must be positive, got {args.steps}, {args.batch_size}"),
              file=sys.stderr)
        return 2
    model = pretrain(args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, config=config)
    out = args.out or (None if name == "builtin" else str(files("fraqat_jax") / "assets" / BUILTIN_TEACHERS[name]))
    path = save_builtin_teacher(model, out)
    print(f"saved the teacher to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
