"""Sana port against diffusers' SanaTransformer2DModel on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import MODEL_CLASSES, PRESETS, from_diffusers  # noqa: E402
from parity_utils import assert_close, preset_count, randomize  # noqa: E402


def _run(model, **inputs):
    """One jitted forward (a single XLA compile is much cheaper than op-by-op dispatch)."""
    return nnx.jit(lambda m, kwargs: m(**kwargs))(model, inputs)


# Sana 600M/1.6B-like: no position embedding, different self/cross head layouts.
PLAIN = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=4, cross_attention_head_dim=4, cross_attention_dim=16,
    caption_channels=12, mlp_ratio=2.5, sample_size=8, patch_size=1, interpolation_scale=None,
)
# Sana 1.5 / 4K-like: sincos position embedding, patch 2, biases, qk RMSNorm, guidance embedding.
GUIDED = dict(
    in_channels=3, out_channels=5, num_attention_heads=3, attention_head_dim=4, num_layers=1,
    num_cross_attention_heads=2, cross_attention_head_dim=6, cross_attention_dim=12,
    caption_channels=10, mlp_ratio=2.0, sample_size=8, patch_size=2, interpolation_scale=1,
    attention_bias=True, qk_norm="rms_norm_across_heads", guidance_embeds=True,
)


def _torch_forward(model, x, captions, t, **extra):
    with torch.no_grad():
        return model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(captions),
                     timestep=torch.from_numpy(t),
                     **{k: torch.from_numpy(v) for k, v in extra.items()},
                     return_dict=False)[0].numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_parity_linear_attention_mask_non_square(scan_layers, tmp_path):
    ref_model = diffusers.SanaTransformer2DModel(**PLAIN).eval()
    randomize(ref_model, 0)
    ref_model.save_pretrained(tmp_path)
    model = from_diffusers(tmp_path, scan_layers=scan_layers)
    assert type(model).__name__ == "SanaTransformer2DModel"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 10)).astype(np.float32)
    captions = rng.standard_normal((2, 7, 12)).astype(np.float32)
    t = np.array([17.0, 910.0], np.float32)
    mask = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0]], np.int64)
    ref = _torch_forward(ref_model, x, captions, t, encoder_attention_mask=mask)
    out = _run(model, hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(captions),
               timestep=jnp.asarray(t), encoder_attention_mask=jnp.asarray(mask))
    assert out.shape == (2, 4, 6, 10)
    assert_close(out, ref)
    # the padded caption acts like the caption cut at its padding
    cut = _run(model, hidden_states=jnp.asarray(x[1:]), encoder_hidden_states=jnp.asarray(captions[1:, :3]),
               timestep=jnp.asarray(t[1:]))
    np.testing.assert_allclose(np.asarray(out[1:]), np.asarray(cut), rtol=0, atol=1e-5)


def test_parity_guidance_pos_embed_qk_norm(tmp_path):
    ref_model = diffusers.SanaTransformer2DModel(**GUIDED).eval()
    randomize(ref_model, 1)
    ref_model.save_pretrained(tmp_path)
    model = from_diffusers(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 12)).astype(np.float32)  # non-square: sincos grid rebuilt
    captions = rng.standard_normal((2, 3, 10)).astype(np.float32)
    t = np.array([250.0, 5.0], np.float32)
    guidance = np.array([4.5, 1.0], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.int64)
    ref = _torch_forward(ref_model, x, captions, t, guidance=guidance, encoder_attention_mask=mask)
    out = _run(model, hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(captions),
               timestep=jnp.asarray(t), guidance=jnp.asarray(guidance), encoder_attention_mask=jnp.asarray(mask))
    assert out.shape == (2, 5, 8, 12)
    assert_close(out, ref)
    with pytest.raises(ValueError, match="guidance"):
        model(hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(captions),
              timestep=jnp.asarray(t))


def test_bf16_stays_close_and_remat_gradients_match_diffusers(tmp_path):
    ref_model = diffusers.SanaTransformer2DModel(**PLAIN).eval()
    randomize(ref_model, 2)
    ref_model.save_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    captions = rng.standard_normal((1, 3, 12)).astype(np.float32)
    inputs = dict(hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(captions),
                  timestep=jnp.array([500.0]))
    ref = _run(from_diffusers(tmp_path), **inputs)
    # bf16 compute; the linear attention's sums still run in float32 inside
    out = _run(from_diffusers(tmp_path, dtype=jnp.bfloat16), **inputs)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) <= 5e-2 * float(jnp.abs(ref).max())

    # backward through rematerialised blocks == torch autograd through diffusers
    cotangent = rng.standard_normal(ref.shape).astype(np.float32)
    tx, tc = torch.from_numpy(x).requires_grad_(), torch.from_numpy(captions).requires_grad_()
    torch_out = ref_model(tx, encoder_hidden_states=tc, timestep=torch.tensor([500.0]), return_dict=False)[0]
    (torch_out * torch.from_numpy(cotangent)).sum().backward()

    graphdef, state = nnx.split(from_diffusers(tmp_path, remat=True))

    @jax.jit
    def grads(state, x, c):
        def loss(state, x, c):
            model = nnx.merge(graphdef, state)
            return (model(hidden_states=x, encoder_hidden_states=c, timestep=jnp.array([500.0])) * cotangent).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(state, x, c)

    g_state, gx, gc = grads(state, inputs["hidden_states"], inputs["encoder_hidden_states"])
    assert_close(gx, tx.grad.numpy())
    assert_close(gc, tc.grad.numpy())
    depthwise = ref_model.transformer_blocks[0].ff.conv_depth.weight.grad.numpy()  # OIHW
    assert_close(g_state["transformer_blocks"][0]["ff"]["conv_depth"]["kernel"][...],
                  depthwise.transpose(2, 3, 1, 0))


def test_depthwise_conv_is_a_grouped_nnx_conv():
    model = nnx.eval_shape(lambda: MODEL_CLASSES["SanaTransformer2DModel"](PLAIN, rngs=nnx.Rngs(0)))
    conv = model.transformer_blocks[0].ff.conv_depth
    assert isinstance(conv, nnx.Conv)
    hidden = 2 * int(2.5 * 16)
    assert conv.kernel.shape == (3, 3, 1, hidden)


@pytest.mark.parametrize("name,low,high", [("Sana-600M", 0.55e9, 0.65e9), ("Sana-1.6B", 1.5e9, 1.7e9)])
def test_preset_parameter_count_matches_diffusers(name, low, high):
    class_name, config = PRESETS[name]
    assert class_name == "SanaTransformer2DModel"
    with torch.device("meta"):
        ref = diffusers.SanaTransformer2DModel(**config)
    expected = sum(p.numel() for p in ref.parameters())
    count = preset_count(class_name, config)
    assert count == expected
    assert low < count < high


def test_every_parameter_has_logical_sharding_names():
    model = nnx.eval_shape(lambda: MODEL_CLASSES["SanaTransformer2DModel"](GUIDED, rngs=nnx.Rngs(0)))
    params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        assert set(names) <= {None, "embed", "mlp", "heads", "norm"}, (path, names)
