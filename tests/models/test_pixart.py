"""PixArt-Sigma port against diffusers' PixArtTransformer2DModel on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import MODEL_CLASSES, PRESETS, from_diffusers  # noqa: E402
from parity_utils import assert_close, preset_count, randomize  # noqa: E402


def _save_random(config: dict, tmp_path, seed: int):
    model = diffusers.PixArtTransformer2DModel(**config).eval()
    randomize(model, seed)
    model.save_pretrained(tmp_path)
    return model


def _run(model, **inputs):
    """One jitted forward (a single XLA compile is much cheaper than op-by-op dispatch)."""
    return nnx.jit(lambda m, kwargs: m(**kwargs))(model, inputs)


# Two configs unlike diffusers' own: a T5-style caption projection with a padded-caption mask, and
# PixArt-alpha's size conditioning with patch 1 and captions already at the model width.
CAPTIONED = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=6, num_layers=2,
    cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2,
    interpolation_scale=None, use_additional_conditions=False, norm_eps=1e-6,
)
SIZE_CONDITIONED = dict(
    num_attention_heads=3, attention_head_dim=4, in_channels=3, out_channels=None, num_layers=1,
    cross_attention_dim=12, caption_channels=None, sample_size=6, patch_size=1,
    interpolation_scale=2, use_additional_conditions=True, attention_bias=False,
)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_parity_captions_mask_non_square(scan_layers, tmp_path):
    ref_model = _save_random(CAPTIONED, tmp_path, seed=0)
    model = from_diffusers(tmp_path, scan_layers=scan_layers)
    assert type(model).__name__ == "PixArtTransformer2DModel"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)  # non-square: position embedding rebuilt
    captions = rng.standard_normal((2, 5, 12)).astype(np.float32)
    t = np.array([3.0, 731.0], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int64)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(captions),
                        timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
                        return_dict=False)[0].numpy()
    out = _run(model, hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(captions),
               timestep=jnp.asarray(t), added_cond_kwargs=None, encoder_attention_mask=jnp.asarray(mask))
    assert out.shape == (2, 6, 8, 12)
    assert_close(out, ref)

    # A padded caption means the same as the caption cut at its padding.
    cut = _run(model, hidden_states=jnp.asarray(x[1:]), encoder_hidden_states=jnp.asarray(captions[1:, :2]),
               timestep=jnp.asarray(t[1:]))
    np.testing.assert_allclose(np.asarray(out[1:]), np.asarray(cut), rtol=0, atol=1e-5)


def test_parity_size_conditions_no_caption_projection(tmp_path):
    ref_model = _save_random(SIZE_CONDITIONED, tmp_path, seed=1)
    model = from_diffusers(tmp_path, remat=True)  # rematerialised blocks compute the same values
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    context = rng.standard_normal((2, 4, 12)).astype(np.float32)
    t = np.array([999.0, 40.0], np.float32)
    cond = {"resolution": np.array([[512.0, 768.0], [1024.0, 1024.0]], np.float32),
            "aspect_ratio": np.array([[1.5], [1.0]], np.float32)}
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context),
                        timestep=torch.from_numpy(t),
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in cond.items()},
                        return_dict=False)[0].numpy()
    out = _run(model, hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(context),
               timestep=jnp.asarray(t), added_cond_kwargs={k: jnp.asarray(v) for k, v in cond.items()})
    assert_close(out, ref)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(hidden_states=jnp.asarray(x), encoder_hidden_states=jnp.asarray(context),
              timestep=jnp.asarray(t))


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    _save_random(CAPTIONED, tmp_path, seed=2)
    rng = np.random.default_rng(2)
    inputs = dict(hidden_states=jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32),
                  encoder_hidden_states=jnp.asarray(rng.standard_normal((1, 3, 12)), jnp.float32),
                  timestep=jnp.array([500.0]))
    ref = _run(from_diffusers(tmp_path), **inputs)
    out = _run(from_diffusers(tmp_path, dtype=jnp.bfloat16), **inputs)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) <= 5e-2 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("name", ["PixArt-Sigma-XL-2-1024", "PixArt-Sigma-XL-2-512"])
def test_preset_parameter_count_matches_diffusers(name):
    class_name, config = PRESETS[name]
    assert class_name == "PixArtTransformer2DModel"
    with torch.device("meta"):
        ref = diffusers.PixArtTransformer2DModel(**config)
    expected = sum(p.numel() for p in ref.parameters())
    count = preset_count(class_name, config)
    assert count == expected
    assert 0.55e9 < count < 0.65e9  # PixArt-Sigma XL/2 is ~0.6B parameters


def test_unsupported_norm_type_is_rejected():
    with pytest.raises(ValueError, match="norm_type"):
        MODEL_CLASSES["PixArtTransformer2DModel"](dict(CAPTIONED, norm_type="ada_norm_zero"),
                                                 rngs=nnx.Rngs(0))


def test_every_parameter_has_logical_sharding_names():
    model = nnx.eval_shape(lambda: MODEL_CLASSES["PixArtTransformer2DModel"](CAPTIONED, rngs=nnx.Rngs(0)))
    params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        assert set(names) <= {None, "embed", "mlp", "heads", "norm"}, (path, names)
