"""Helpers shared by the diffusers parity tests (imported by module name: pytest puts this folder on sys.path)."""

import numpy as np
from flax import nnx

from fraqat_jax.models import MODEL_CLASSES, count_params


def preset_count(class_name, config):
    """Parameter count of the full-size port from ``nnx.eval_shape`` (no memory spent)."""
    return count_params(nnx.eval_shape(lambda: MODEL_CLASSES[class_name](config, rngs=nnx.Rngs(0))))


def assert_close(ours, ref):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    tol = 2e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"
