"""Fixtures for the trainer tests: a tiny random DiT teacher saved as a diffusers folder."""

import os
import subprocess
import sys

import numpy as np
import pytest

TINY_DIT = {
    "sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 2, "num_layers": 1,
    "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10,
}


def write_tiny_teacher(directory: str, seed: int = 0) -> str:
    """A 1-block DiT with learned-sigma output (2 channels) and every weight random: adaLN-Zero's
    zero init would make teacher and student output zeros and the loss trivially 0."""
    import jax.numpy as jnp
    from flax import nnx

    from fraqat_jax.models import DiTTransformer2DModel
    from fraqat_jax.diffusion.teachers import save_builtin_teacher

    model = nnx.eval_shape(lambda: DiTTransformer2DModel(TINY_DIT, rngs=nnx.Rngs(seed)))  # no init compute
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(model)):
        shape = v.get_value().shape
        fan_in = shape[0] if len(shape) > 1 else 8
        v.set_value(jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), jnp.float32))
    return save_builtin_teacher(model, directory)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return write_tiny_teacher(str(tmp_path_factory.mktemp("tiny_teacher")))


def _base_overrides(teacher: str) -> dict:
    """A fast run on the tiny teacher: no sample grids, logging every step."""
    return {"teacher": teacher, "batch_size": 16, "log_every": 1, "sample_grids": False, "progress": "none",
            "checkpoint_every": 5, "keep_checkpoints": 10, "warmup_steps": 2, "lr": 1e-3}


def _cli(args, env=None, **kw):
    """Runs ``python -m fraqat_jax.train`` in a subprocess."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fraqat_jax.train", *args], env=full_env,
                          capture_output=True, text=True, **kw)


@pytest.fixture
def base(tiny_teacher):
    """Config overrides for a fast run on the tiny teacher."""
    return _base_overrides(tiny_teacher)


@pytest.fixture
def sub_env():
    """Environment for subprocess runs: CPU, sharing the suite's compilation cache (tests/conftest.py)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture
def cli(sub_env):
    def call(args, env=None, **kw):
        return _cli(args, env={**sub_env, **(env or {})}, **kw)

    return call
