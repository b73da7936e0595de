"""SD3 / SD3.5 MMDiT port against diffusers' SD3Transformer2DModel on the same random weights."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import PRESETS, SD3Transformer2DModel, count_params, create, from_diffusers  # noqa: E402
from parity_utils import assert_close  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (adaLN-Zero layers, qk-norm scales); the pos-embed buffer stays."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.06)


def _apply(model, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def _inputs(config, batch, height, width, context_len, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, config["in_channels"], height, width)).astype(np.float32),
        rng.standard_normal((batch, context_len, config["joint_attention_dim"])).astype(np.float32),
        rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32),
        rng.uniform(0, 1000, size=batch).astype(np.float32),
    )


def _torch_forward(model, x, ctx, pooled, t, **kwargs):
    with torch.no_grad():
        return model(
            hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t), **kwargs,
        ).sample.numpy()


def _save_random(config, path, seed):
    ref = diffusers.SD3Transformer2DModel(**config).eval()
    _randomize(ref, seed)
    ref.save_pretrained(path)
    return ref


# SD3: patch 2, no qk-norm; 3 blocks so the middle one is a plain joint block and the last
# context_pre_only; context projected from a wider text width.
SD3_CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                  attention_head_dim=8, num_attention_heads=3, joint_attention_dim=20,
                  caption_projection_dim=24, pooled_projection_dim=12, pos_embed_max_size=10)
# SD3.5: RMS qk-norm, dual attention in the first two of three blocks, patch 1, out != in.
SD35_CONFIG = dict(sample_size=8, patch_size=1, in_channels=3, out_channels=5, num_layers=3,
                   attention_head_dim=4, num_attention_heads=4, joint_attention_dim=8,
                   caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=14,
                   dual_attention_layers=(0, 1), qk_norm="rms_norm")
# One block that is both dual-attention and context_pre_only.
SD35_SINGLE_BLOCK = dict(SD35_CONFIG, num_layers=1, dual_attention_layers=(0,), patch_size=2)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_sd3_parity_and_skip_layers(scan_layers, tmp_path):
    ref_model = _save_random(SD3_CONFIG, tmp_path, seed=0)
    model = from_diffusers(tmp_path, scan_layers=scan_layers)  # scan: blocks 0-1 stacked, 2 on its own
    assert isinstance(model, SD3Transformer2DModel)
    assert model.transformer_blocks[2].context_pre_only and model.transformer_blocks[2].ff_context is None
    x, ctx, pooled, t = _inputs(SD3_CONFIG, 2, 16, 16, 7, seed=0)
    assert_close(_apply(model, x, ctx, pooled, t), _torch_forward(ref_model, x, ctx, pooled, t))
    assert_close(
        _apply(model, x, ctx, pooled, t, skip_layers=(1,)),
        _torch_forward(ref_model, x, ctx, pooled, t, skip_layers=[1]),
    )


@pytest.mark.parametrize(
    "config,height,width",
    [(SD35_CONFIG, 6, 11), (SD35_SINGLE_BLOCK, 12, 4)],
    ids=["dual_qknorm_nonsquare", "single_dual_pre_only_block"],
)
def test_sd35_parity_non_square(config, height, width, tmp_path):
    ref_model = _save_random(config, tmp_path, seed=1)
    model = from_diffusers(tmp_path)
    block0 = model.transformer_blocks[0]
    assert block0.attn2 is not None and block0.attn.norm_added_q is not None
    x, ctx, pooled, t = _inputs(config, 2, height, width, 5, seed=1)
    assert_close(_apply(model, x, ctx, pooled, t), _torch_forward(ref_model, x, ctx, pooled, t))


def test_input_larger_than_position_table_is_rejected():
    config = dict(SD35_SINGLE_BLOCK, pos_embed_max_size=4)
    model = nnx.eval_shape(lambda: SD3Transformer2DModel(config, rngs=nnx.Rngs(0)))
    x, ctx, pooled, t = _inputs(config, 1, 10, 8, 3, seed=0)
    with pytest.raises(ValueError, match="pos_embed_max_size=4"):
        nnx.eval_shape(lambda m: m(x, ctx, pooled, t), model)


@pytest.mark.parametrize("preset", ["SD3.5-Medium"])
def test_preset_param_count_matches_diffusers(preset):
    class_name, config = PRESETS[preset]
    abstract = nnx.eval_shape(lambda: create(preset, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = getattr(diffusers, class_name)(**config)
    expected = sum(p.numel() for p in ref.parameters())
    assert count_params(abstract) == expected
    assert 2.2e9 < expected < 2.3e9  # SD3.5-Medium's MMDiT-X transformer
    # The position table is a buffer (not a parameter) but is loaded from checkpoints.
    buffers = dict(ref.named_buffers())
    assert abstract.pos_embed.pos_embed.shape == tuple(buffers["pos_embed.pos_embed"].shape)


def test_quantized_8bit_stays_close(tmp_path):
    import fraqat_jax
    config = dict(SD3_CONFIG, num_layers=2)
    _save_random(config, tmp_path, seed=2)
    model = from_diffusers(tmp_path)
    x, ctx, pooled, t = _inputs(config, 2, 16, 16, 7, seed=2)
    ref = np.asarray(_apply(model, x, ctx, pooled, t))
    quant = fraqat_jax.quantize_model(model, [fraqat_jax.Rule(r".*", weight_bits=8, act_bits=8)])
    n_quantized = sum(1 for _ in fraqat_jax.nn.quantized_layers(quant))
    # every Linear of both blocks (11 in the context_pre_only one), the 7 embedder/output
    # Linears and the patch Conv
    assert n_quantized == 14 + 11 + 7 + 1
    out = np.asarray(_apply(quant, x, ctx, pooled, t))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.05, rel
    # and 4 bits is clearly worse than 8 (the quantizer is really in the forward pass)
    fraqat_jax.set_bits(quant, 4)
    rel4 = np.linalg.norm(np.asarray(_apply(quant, x, ctx, pooled, t)) - ref) / np.linalg.norm(ref)
    assert rel4 > 2 * rel
