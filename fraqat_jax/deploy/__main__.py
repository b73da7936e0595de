"""``python -m fraqat_jax.deploy DIR ...``: run a folder written by ``export --format qnn``.

The folder's ``pipeline.json`` says its ``kind``: ``"image"`` runs :mod:`fraqat_jax.deploy.image`
(``--prompt TEXT | --label K``, ``--out IMAGE.png``), ``"text"`` runs :mod:`fraqat_jax.deploy.text`.
Each kind module offers ``add_arguments(parser)`` (its own flags) and ``run(manifest, folder,
args)``. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import importlib
import sys

from fraqat_jax.cli import Parser, fail
from fraqat_jax.deploy.common import PROVIDERS, DeployError, qnn_library, read_manifest

__all__ = ["base_parser", "main"]

PROG = "python -m fraqat_jax.deploy"


def base_parser() -> Parser:
    """The flags every kind shares: ``DIR``, ``--prompt``, ``--seed``, ``--provider``, ``--out``."""
    p = Parser(prog=PROG, description="Run an exported pipeline folder (pipeline.json) with onnxruntime: "
                                      "QNN HTP (--provider qnn) or the CPU; no JAX needed.")
    p.add_argument("folder", metavar="DIR", help="a folder written by python -m fraqat_jax.export --format qnn")
    p.add_argument("--prompt", default=None, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--provider", choices=PROVIDERS, default="qnn",
                   help="qnn: Qualcomm's HTP backend (onnxruntime-qnn), CPU fallback disabled (default); "
                        "cpu: onnxruntime's CPU provider on the same graphs")
    p.add_argument("--out", default=None, help="where to write the result (an image: a .png file)")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = base_parser().parse_known_args(argv)
    try:
        manifest = read_manifest(known.folder)
        kind = importlib.import_module(f"fraqat_jax.deploy.{manifest['kind']}")
        parser = base_parser()
        kind.add_arguments(parser)
        args = parser.parse_args(argv)
        if args.provider == "qnn":
            qnn_library()  # the plugin first: without it, exit 2 before anything is read
        return kind.run(manifest, args.folder, args)
    except DeployError as e:
        fail(e)


if __name__ == "__main__":
    main()
