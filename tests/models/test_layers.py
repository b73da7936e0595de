"""Shared building blocks against the diffusers modules they mirror, weights moved by the
generic converter (so the name mapping of each block is tested too)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from diffusers.models import attention as d_attention  # noqa: E402
from diffusers.models import attention_processor as d_attn  # noqa: E402
from diffusers.models import embeddings as d_emb  # noqa: E402

from fraqat_jax.models.attention import Attention  # noqa: E402
from fraqat_jax.models.convert import load_state_dict  # noqa: E402
from fraqat_jax.models.activations import FeedForward  # noqa: E402
from fraqat_jax.models.common import LayerNorm  # noqa: E402
from fraqat_jax.models.embeddings import get_2d_sincos_pos_embed, timestep_embedding  # noqa: E402


def _port(ours: nnx.Module, theirs: torch.nn.Module, seed: int) -> nnx.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return load_state_dict(ours, {k: v.numpy() for k, v in theirs.state_dict().items()})


def _close(ours, ref, tol=2e-5):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=0)


@pytest.mark.parametrize(
    "dim,flip,shift,scale", [(256, True, 1, 1.0), (7, False, 0, 2.0)], ids=["dit", "odd_dim_scaled"]
)
def test_timestep_embedding(dim, flip, shift, scale):
    t = np.array([0.0, 1.5, 999.0], np.float32)
    ref = d_emb.get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale
    ).numpy()
    # float32 angles up to ~2000 rad: one ulp of exp() in the frequencies moves sin/cos by ~1e-4
    _close(timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale), ref, 2e-4)


@pytest.mark.parametrize("grid,base,interp", [(6, 3, 1.0), ((3, 5), 4, 2.0)], ids=["square", "non_square"])
def test_2d_sincos_table(grid, base, interp):
    ref = d_emb.get_2d_sincos_pos_embed(24, grid, base_size=base, interpolation_scale=interp).float().numpy()
    _close(get_2d_sincos_pos_embed(24, grid, base_size=base, interpolation_scale=interp), ref, 1e-6)


@pytest.mark.parametrize("activation", ["geglu", "swiglu", "gelu", "geglu-approximate", "linear-silu"])
def test_feed_forward_variants(activation):
    theirs = d_attention.FeedForward(12, dim_out=10, mult=2, activation_fn=activation).eval()
    ours = _port(nnx.eval_shape(lambda: FeedForward(12, 10, mult=2, activation_fn=activation, rngs=nnx.Rngs(0))),
                 theirs, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 12)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
    _close(ours(x), ref)


def test_cross_attention_with_key_mask_and_layer_qk_norm():
    theirs = d_attn.Attention(12, cross_attention_dim=10, heads=3, dim_head=4, bias=True, qk_norm="layer_norm").eval()
    ours = _port(
        nnx.eval_shape(lambda: Attention(12, heads=3, dim_head=4, cross_attention_dim=10, bias=True,
                                         qk_norm="layer_norm", rngs=nnx.Rngs(0))),
        theirs, seed=2,
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, 10)).astype(np.float32)
    keep = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    additive = np.where(keep, 0.0, -1e4).astype(np.float32)[:, None, :]  # diffusers' [B, 1, S] bias
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), torch.from_numpy(ctx), attention_mask=torch.from_numpy(additive)).numpy()
    _close(ours(x, ctx, attention_mask=keep[:, None, None, :]), ref)


def test_layer_norm_matches_torch_with_affine():
    theirs = torch.nn.LayerNorm(6, eps=1e-3)
    ours = _port(LayerNorm(6, eps=1e-3), theirs, seed=3)
    x = (np.random.default_rng(2).standard_normal((4, 6)) * 5 + 3).astype(np.float32)
    with torch.no_grad():
        _close(ours(jnp.asarray(x)), theirs(torch.from_numpy(x)).numpy())
