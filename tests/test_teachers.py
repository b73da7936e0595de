"""The shipped built-in teachers (``builtin``, ``builtin:m``) and the command that makes them.

The check of a shipped teacher is what it was trained for: on held-out digits noised by the DDPM
forward process (numpy formula), its epsilon prediction beats the trivial predictors by far.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fraqat_jax
from fraqat_jax import pretrain
from fraqat_jax.data import digits
from fraqat_jax.models import DiTTransformer2DModel, count_params
from fraqat_jax.diffusion.teachers import BUILTIN_TEACHERS, load_builtin_teacher


def _denoising_mse(model, n=256, seed=0):
    """Mean epsilon-prediction MSE over timesteps 50..950 on digits the teacher was not fed in this
    order (position 10**6 of the source), with the DDPM linear betas written out in numpy."""
    rng = np.random.default_rng(seed)
    batch = digits(seed=123).batch(10**6, n)
    x0, y = batch["latents"], batch["class_labels"]
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp = np.cumprod(1.0 - betas)
    t = rng.integers(50, 950, n)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    a = acp[t][:, None, None, None]
    x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
    out = nnx.jit(lambda m, x, tt, c: m(hidden_states=x, timestep=tt, class_labels=c))(
        model, jnp.asarray(x_t), jnp.asarray(t, jnp.float32), jnp.asarray(y))
    pred = np.asarray(out)[:, :1]
    return float(np.mean((pred - eps) ** 2))


@pytest.mark.parametrize("name, config, params", [("builtin", pretrain.TEACHER_CONFIG, (0.3e6, 0.5e6)),
                                                  ("builtin:m", pretrain.TEACHER_CONFIG_M, (3.5e6, 4.2e6))])
def test_shipped_teacher_denoises_digits(name, config, params):
    model = load_builtin_teacher(name)
    assert dict(model.config).items() >= config.items()
    lo, hi = params
    assert lo < count_params(model) < hi
    folder = os.path.join(os.path.dirname(fraqat_jax.__file__), "assets", BUILTIN_TEACHERS[name])
    assert os.path.getsize(os.path.join(folder, "diffusion_pytorch_model.safetensors")) < 20 * 2**20
    # predicting zero noise scores 1.0; an untrained model of the same shape about as badly
    mse = _denoising_mse(model)
    untrained = _denoising_mse(DiTTransformer2DModel(config, rngs=nnx.Rngs(0)))
    assert mse < 0.15 and untrained > 0.5, (mse, untrained)


def test_builtin_m_is_ten_times_the_small_one():
    small, medium = (count_params(nnx.eval_shape(lambda c=c: DiTTransformer2DModel(c, rngs=nnx.Rngs(0))))
                     for c in (pretrain.TEACHER_CONFIG, pretrain.TEACHER_CONFIG_M))
    assert 8 < medium / small < 12


def test_pretrain_command_writes_a_loadable_teacher(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert pretrain.main(["--size", "s", "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert "saved the teacher" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    from fraqat_jax.models import from_diffusers

    assert count_params(from_diffusers(str(out))) == count_params(load_builtin_teacher("builtin"))


@pytest.mark.parametrize("argv, needle", [(["--size", "xl"], "--size 'xl' is not allowed"),
                                          (["--steps", "0"], "--steps and --batch-size must be positive")])
def test_pretrain_bad_input_exits_2(argv, needle, capsys, tmp_path):
    assert pretrain.main([*argv, "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
