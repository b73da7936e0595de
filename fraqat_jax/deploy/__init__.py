"""deploy/: run an exported pipeline folder on the host with onnxruntime, without JAX.

``python -m fraqat_jax.deploy DIR ...`` reads ``DIR/pipeline.json`` and dispatches on its ``kind``:
``image`` (:mod:`fraqat_jax.deploy.image`: tokenize or take a label, the sampler loop with guidance,
decode, a PNG) or ``text`` (:mod:`fraqat_jax.deploy.text`). :mod:`fraqat_jax.deploy.common` holds
what both share. Needs only numpy, onnxruntime (with ``onnxruntime-qnn`` for ``--provider qnn``),
tokenizers and Pillow. It imports ``cli/`` and nothing else of the package, so that it runs where
JAX is not installed and ports line by line to an app.
"""

from fraqat_jax.deploy.common import (EP_NAME, KINDS, MANIFEST, PROVIDERS, Component, DeployError, Timer,
                                      component_path, load_component, make_session, qnn_library, read_manifest)

__all__ = ["EP_NAME", "KINDS", "MANIFEST", "PROVIDERS", "Component", "DeployError", "Timer", "component_path",
           "load_component", "main", "make_session", "qnn_library", "read_manifest"]


def __getattr__(name):
    if name == "main":
        from fraqat_jax.deploy.__main__ import main

        return main
    raise AttributeError(f"module 'fraqat_jax.deploy' has no attribute {name!r}")
