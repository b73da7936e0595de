"""DiT port against diffusers' DiTTransformer2DModel on the same random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import PRESETS, DiTTransformer2DModel, count_params, create, from_diffusers  # noqa: E402
from parity_utils import assert_close  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, so adaLN-Zero layers do not hide anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.08)


def _apply(model, *args):
    """Jitted forward (eager NNX dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def _torch_forward(model, x, t, y):
    with torch.no_grad():
        return model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()


# Learned-sigma output (out = 2 * in), labels incl. the null class, fractional timesteps.
LEARNED_SIGMA = dict(sample_size=8, patch_size=2, in_channels=3, out_channels=6, num_layers=2,
                     attention_head_dim=16, num_attention_heads=2, num_embeds_ada_norm=10)
# Patch 4, exact GELU, no attention bias, affine norm3 (scale/bias loaded), custom eps.
AFFINE_PATCH4 = dict(sample_size=16, patch_size=4, in_channels=4, num_layers=3, attention_head_dim=8,
                     num_attention_heads=3, num_embeds_ada_norm=7, activation_fn="gelu", attention_bias=False,
                     norm_elementwise_affine=True, norm_eps=1e-6)


@pytest.mark.parametrize("config,seed,scan_layers", [(LEARNED_SIGMA, 0, False), (AFFINE_PATCH4, 1, False),
                                                     (AFFINE_PATCH4, 1, True)],
                         ids=["learned_sigma", "affine_p4", "affine_p4_scan"])
def test_parity_with_class_labels(config, seed, scan_layers, tmp_path):
    torch.manual_seed(seed)
    ref_model = diffusers.DiTTransformer2DModel(**config).eval()
    _randomize(ref_model, seed)
    ref_model.save_pretrained(tmp_path)
    model = from_diffusers(tmp_path, scan_layers=scan_layers)
    assert isinstance(model, DiTTransformer2DModel)
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    x = rng.standard_normal((3, config["in_channels"], size, size)).astype(np.float32)
    t = np.array([0.0, 17.5, 999.0], np.float32)
    y = np.array([0, config["num_embeds_ada_norm"] - 1, config["num_embeds_ada_norm"]])  # last: null class
    assert_close(_apply(model, x, t, y), _torch_forward(ref_model, x, t, y))


def test_trainer_tiny_config_adaln_zero_init_and_remat():
    """The digits teacher's shape: 1 channel in, learned sigma out. A fresh model is adaLN-Zero
    (outputs exactly zero) yet trainable (gradient reaches the output projection); remat changes
    neither the output nor the gradients."""
    config = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=2, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, num_embeds_ada_norm=10)
    x = jax.random.normal(jax.random.key(0), (4, 1, 8, 8))
    t = jnp.array([1, 10, 100, 999])
    y = jnp.array([0, 3, 9, 10])

    @functools.partial(jax.jit, static_argnums=0)
    def _loss_and_grad(graphdef, params, rest):
        def loss(p):
            out = nnx.merge(graphdef, p, rest)(x, t, y)
            return jnp.mean((out - 1.0) ** 2), out

        return jax.value_and_grad(loss, has_aux=True)(params)

    def loss_and_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return _loss_and_grad(graphdef, params, rest)

    model = DiTTransformer2DModel(config, rngs=nnx.Rngs(0))
    (_, out), grads = loss_and_grad(model)
    assert out.shape == (4, 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert float(jnp.abs(grads["proj_out_2"]["kernel"][...]).max()) > 0

    # Perturb everything so that remat is compared on a non-trivial function.
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))
    (loss_plain, out_plain), g_plain = loss_and_grad(model)
    model.remat = True  # what DiTTransformer2DModel(..., remat=True) sets; saves a second init
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t, y))(state)
    assert str(jaxpr).count("remat") == config["num_layers"]  # one checkpoint per block
    (loss_remat, out_remat), g_remat = loss_and_grad(model)
    assert float(jnp.abs(out_plain).max()) > 0.1
    np.testing.assert_allclose(np.asarray(out_remat), np.asarray(out_plain), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bf16_compute_and_all_bf16(tmp_path):
    config = dict(LEARNED_SIGMA, num_layers=1)
    ref_model = diffusers.DiTTransformer2DModel(**config).eval()
    _randomize(ref_model, 3)
    ref_model.save_pretrained(tmp_path)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    t, y = np.array([5.0, 500.0], np.float32), np.array([1, 2])
    ref = _torch_forward(ref_model, x, t, y)
    mixed = from_diffusers(tmp_path, dtype=jnp.bfloat16)
    assert mixed.transformer_blocks[0].attn1.to_q.kernel[...].dtype == jnp.float32
    all_bf16 = from_diffusers(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all_bf16.transformer_blocks[0].attn1.to_q.kernel[...].dtype == jnp.bfloat16
    scale = float(np.abs(ref).max())
    for m in (mixed, all_bf16):
        out = _apply(m, x, t, y)
        assert out.dtype == jnp.bfloat16
        err = float(np.abs(np.asarray(out, np.float32) - ref).max())
        assert err < 0.05 * scale, err  # bf16 has 8 mantissa bits


def test_sharding_names_on_params():
    model = DiTTransformer2DModel(dict(LEARNED_SIGMA), rngs=nnx.Rngs(0))
    block = model.transformer_blocks[0]
    assert block.attn1.to_q.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert block.attn1.to_out[0].kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert block.ff.net[0].proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert block.ff.net[2].kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["transformer_blocks"][0]["ff"]["net"][2]["kernel"].get_value()) == ("mlp", "embed")


@pytest.mark.parametrize("preset", ["DiT-XL/2-256", "DiT-XL/2-512"])
def test_preset_param_count_matches_diffusers(preset):
    class_name, config = PRESETS[preset]
    abstract = nnx.eval_shape(lambda: create(preset, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = getattr(diffusers, class_name)(**config)
    expected = sum(p.numel() for p in ref.parameters())
    assert count_params(abstract) == expected
    assert expected > 600e6  # DiT-XL/2 (diffusers keeps one timestep/label embedder per block)
