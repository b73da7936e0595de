"""FLUX.1 port against diffusers' FluxTransformer2DModel on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import MODEL_CLASSES, PRESETS, from_diffusers  # noqa: E402
from parity_utils import assert_close, preset_count, randomize  # noqa: E402


_FORWARD = nnx.jit(lambda model, kwargs: model(**kwargs))


def _run(model, **inputs):
    """Jitted forward; one shared jit so same-structure models and shapes compile once."""
    return _FORWARD(model, inputs)


def _image_ids(height, width, frame=0.0, offset=(0.0, 0.0)):
    """FLUX-style ids: axis 0 a frame index, axes 1/2 the row/column of each packed token."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 0] = frame
    ids[..., 1] = np.arange(height)[:, None] + offset[0]
    ids[..., 2] = np.arange(width)[None, :] + offset[1]
    return ids.reshape(height * width, 3)


SCHNELL_LIKE = dict(
    patch_size=1, in_channels=8, out_channels=None, num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=12,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)
DEV_LIKE = dict(
    patch_size=1, in_channels=4, out_channels=6, num_layers=1, num_single_layers=3,
    attention_head_dim=8, num_attention_heads=3, joint_attention_dim=10, pooled_projection_dim=6,
    guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)


def _inputs(config, seed, height, width, text_len, batch=2):
    rng = np.random.default_rng(seed)
    inputs = dict(
        hidden_states=rng.standard_normal((batch, height * width, config["in_channels"])),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config["joint_attention_dim"])),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"])),
        timestep=rng.uniform(0, 1, (batch,)),
        # non-trivial ids: text tokens at distinct positions, image grid shifted off the origin
        img_ids=_image_ids(height, width, frame=1.0, offset=(3.0, 7.0)),
        txt_ids=rng.integers(0, 9, (text_len, 3)).astype(np.float64),
    )
    if config["guidance_embeds"]:
        inputs["guidance"] = rng.uniform(1, 8, (batch,))
    return {k: np.asarray(v, np.float32) for k, v in inputs.items()}


def _torch_forward(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()


@pytest.mark.parametrize("config,seed,shape,scan_layers", [(SCHNELL_LIKE, 0, (3, 5, 4), False),
                                                           (DEV_LIKE, 1, (4, 2, 6), False),
                                                           (SCHNELL_LIKE, 0, (3, 5, 4), True)],
                         ids=["schnell", "dev", "schnell_scan"])
def test_parity_against_diffusers(tmp_path, config, seed, shape, scan_layers):
    ref_model = diffusers.FluxTransformer2DModel(**config).eval()
    randomize(ref_model, seed)
    ref_model.save_pretrained(tmp_path)
    # remat: same forward values; scan: both block lists (2 double, 2 single blocks) under lax.scan
    model = from_diffusers(tmp_path, remat=config["guidance_embeds"], scan_layers=scan_layers)
    assert type(model).__name__ == "FluxTransformer2DModel"
    inputs = _inputs(config, seed, *shape)
    ref = _torch_forward(ref_model, inputs)
    out = _run(model, **{k: jnp.asarray(v) for k, v in inputs.items()})
    out_channels = config["out_channels"] or config["in_channels"]
    assert out.shape == (2, shape[0] * shape[1], out_channels)
    assert_close(out, ref)


def _saved_random(config, seed, path):
    ref_model = diffusers.FluxTransformer2DModel(**config).eval()
    randomize(ref_model, seed)
    ref_model.save_pretrained(path)
    return ref_model


def test_rope_ids_matter_and_guidance_is_required(tmp_path):
    _saved_random(DEV_LIKE, 5, tmp_path)
    model = from_diffusers(tmp_path)
    inputs = {k: jnp.asarray(v) for k, v in _inputs(DEV_LIKE, 2, 2, 3, 4).items()}
    base = _run(model, **inputs)
    # shifting every id by the same amount keeps relative positions, hence attention, unchanged
    shifted = _run(model, **dict(inputs, img_ids=inputs["img_ids"] + 5.0, txt_ids=inputs["txt_ids"] + 5.0))
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(base), atol=2e-4 * float(jnp.abs(base).max()))
    moved = _run(model, **dict(inputs, img_ids=inputs["img_ids"] + 5.0))
    assert float(jnp.abs(moved - base).max()) > 1e-2 * float(jnp.abs(base).max())
    with pytest.raises(ValueError, match="guidance"):
        model(**{k: v for k, v in inputs.items() if k != "guidance"})
    with pytest.raises(ValueError, match="txt_ids"):
        model(**dict(inputs, txt_ids=inputs["txt_ids"][:2]))


def test_quantized_8bit_stays_close(tmp_path):
    import fraqat_jax
    from fraqat_jax.nn import quantized_layers

    config = dict(SCHNELL_LIKE, num_layers=1, num_single_layers=1)
    _saved_random(config, 3, tmp_path)
    inputs = {k: jnp.asarray(v) for k, v in _inputs(config, 3, 3, 3, 4).items()}
    full = _run(from_diffusers(tmp_path), **inputs)
    quantized = fraqat_jax.quantize_model(from_diffusers(tmp_path))  # default rules: every Linear, W8A8
    names = {name for name, _ in quantized_layers(quantized)}
    for name in ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff_context.net.2",
                 "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_k", "x_embedder"):
        assert name in names
    fraqat_jax.set_bits(quantized, 8.0)
    out = _run(quantized, **inputs)
    rel = float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full))
    assert 0.0 < rel < 0.05, rel  # quantization must change something, but only a little


@pytest.mark.parametrize("name,guidance", [("FLUX.1-schnell", False), ("FLUX.1-dev", True)])
def test_preset_parameter_count_matches_diffusers(name, guidance):
    class_name, config = PRESETS[name]
    assert class_name == "FluxTransformer2DModel" and config["guidance_embeds"] == guidance
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**config)
    expected = sum(p.numel() for p in ref.parameters())
    count = preset_count(class_name, config)
    assert count == expected
    assert 11.5e9 < count < 12.5e9  # FLUX.1 is a ~12B-parameter transformer


def test_every_parameter_has_logical_sharding_names():
    model = nnx.eval_shape(lambda: MODEL_CLASSES["FluxTransformer2DModel"](DEV_LIKE, rngs=nnx.Rngs(0)))
    params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        assert set(names) <= {None, "embed", "mlp", "heads", "norm"}, (path, names)
