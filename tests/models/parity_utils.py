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


def randomize(module, seed: int):
    """Every parameter of a torch module random (norm scales, adaLN tables and zero-init
    projections included), so a weight loaded into the wrong place shows up in a parity test.
    Returns the torch generator, for callers that randomize more (buffers) from the same stream."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.ndim >= 2 else 1
            std = fan_in**-0.5 if param.ndim >= 2 else 0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return gen
