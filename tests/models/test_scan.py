"""Scan over layers (fraqat_jax.models.scan): a scanned port computes what the block-by-block port
computes (forward, gradients, quantized), keeps diffusers' per-block names at the boundaries, and
its program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fraqat_jax
from fraqat_jax.models import (
    DiTTransformer2DModel,
    SD3Transformer2DModel,
    load_state_dict,
    to_diffusers_state_dict,
)
from fraqat_jax.models.scan import ScannedBlocks, restack_flat, unscan, unstack_flat

# SD3.5-like: blocks 0-1 dual attention (one stack), 2 plain, 3 context_pre_only.
SD35 = dict(sample_size=8, patch_size=1, in_channels=3, out_channels=5, num_layers=4, attention_head_dim=4,
            num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=6,
            pos_embed_max_size=14, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def _random_tensors(model, seed):
    """Random diffusers-named weights for ``model`` (so adaLN-Zero layers hide nothing)."""
    rng = np.random.default_rng(seed)
    return {k: (0.15 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in to_diffusers_state_dict(model).items()}


def _pair(seed=0, **options):
    """The same random SD3.5-like weights loaded block by block and scanned."""
    tensors = _random_tensors(SD3Transformer2DModel(SD35, rngs=nnx.Rngs(0)), seed)
    build = lambda scan: nnx.eval_shape(
        lambda: SD3Transformer2DModel(SD35, rngs=nnx.Rngs(0), scan_layers=scan, **options))
    return load_state_dict(build(False), tensors), load_state_dict(build(True), tensors), tensors


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 3, 6, 5)).astype(np.float32),
            rng.standard_normal((batch, 4, 8)).astype(np.float32),
            rng.standard_normal((batch, 6)).astype(np.float32),
            np.array([10.0, 700.0][:batch], np.float32))


def _loss_and_grads(model, inputs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest):
        def loss(p):
            out = nnx.merge(graphdef, p, rest)(*inputs)
            return jnp.mean(jnp.square(out - 0.5))

        return jax.value_and_grad(loss)(params)

    return run(params, rest)


def test_scanned_blocks_form_stacks_of_one_structure_and_keep_names():
    loop, scan, tensors = _pair()
    blocks = scan.transformer_blocks
    assert isinstance(blocks, ScannedBlocks) and len(blocks) == 4
    assert [(s.start, s.length) for s in blocks.stacks] == [(0, 2), (2, 1), (3, 1)]
    assert scan.transformer_blocks.stacks[0].block.attn.to_q.kernel.shape == (2, 8, 8)
    # the layer axis is never sharded; the per-layer logical names follow it
    assert scan.transformer_blocks.stacks[0].block.attn.to_q.kernel.get_metadata()["out_sharding"] == (
        None, "embed", "heads")
    # block i of the stack is block i of the list, structure and values
    assert blocks[3].context_pre_only and blocks[3].ff_context is None and blocks[1].attn2 is not None
    np.testing.assert_array_equal(blocks[1].attn.to_k.kernel[...], loop.transformer_blocks[1].attn.to_k.kernel[...])
    # export: the same diffusers keys and values as the unscanned model
    exported = to_diffusers_state_dict(scan)
    assert exported.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # flat state: per-block names out, stacked back in
    flat = list(nnx.to_flat_state(nnx.state(scan)))
    per_block = unstack_flat(scan, flat)
    assert {p for p, _ in per_block} == {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(loop))}
    for (p, a), (q, b) in zip(restack_flat(scan, per_block), flat):
        assert p == tuple(q) and np.array_equal(a.get_value(), b.get_value())
    with pytest.raises(ValueError, match=r"missing transformer_blocks\.1\.attn\.to_q\.kernel"):
        restack_flat(scan, [(p, v) for p, v in per_block if p != ("transformer_blocks", 1, "attn", "to_q", "kernel")])
    # unscan: back to a plain list of blocks holding the same state under the same names
    unscanned = unscan(scan)
    assert isinstance(unscanned.transformer_blocks, nnx.List)
    assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(unscanned), nnx.state(loop)))


def test_scan_matches_loop_forward_and_gradients():
    loop, scan, _ = _pair(remat="dots_with_no_batch_dims_saveable")
    inputs = _inputs()
    loss_loop, grads_loop = _loss_and_grads(loop, inputs)
    loss_scan, grads_scan = _loss_and_grads(scan, inputs)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
    flat_loop = dict(nnx.to_flat_state(grads_loop))
    for path, g in unstack_flat(scan, list(nnx.to_flat_state(grads_scan))):
        np.testing.assert_allclose(g.get_value(), flat_loop[path].get_value(), rtol=1e-4, atol=1e-6,
                                   err_msg=".".join(map(str, path)))


def _symmetric_fake_quant(w, bits):
    """Per-tensor symmetric fake quantization (numpy, the formula of fraqat_jax.quant.fake)."""
    scale = np.abs(w).max() / (2 ** (bits - 1) - 1)
    return np.clip(np.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def test_quantized_scanned_model_has_per_block_bits_and_scales():
    loop, scan, _ = _pair(seed=1)
    qloop = fraqat_jax.quantize_model(loop)
    qscan = fraqat_jax.quantize_model(scan)
    layer = qscan.transformer_blocks.stacks[0].block.ff.net[2]
    assert layer.bits[...].shape == (2,) and layer.act_range[...].shape == (2, 2)
    # per-tensor weight scale per block, never across the stack
    original = layer.kernel[...]
    kernel = np.array(original)
    kernel[1] *= 10.0  # a block with a much larger range must not coarsen the other's grid
    layer.kernel[...] = jnp.asarray(kernel)
    fraqat_jax.set_bits(qscan, 4)
    want = np.stack([_symmetric_fake_quant(kernel[i], 4) for i in range(2)])
    np.testing.assert_allclose(layer.quantized_kernel(), want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(want[0], _symmetric_fake_quant(kernel, 4)[0])  # a stack-wide scale would differ
    layer.kernel[...] = original
    # bits set inside jit on the State (traced): scanned == block by block
    inputs = _inputs(seed=1)

    def run(model, bits_values):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, b: nnx.merge(graphdef, fraqat_jax.set_bits(s, b))(*inputs))
        return [np.asarray(fn(state, jnp.float32(b))) for b in bits_values]  # one compilation

    for scanned, looped in zip(run(qscan, (8.0, 4.5)), run(qloop, (8.0, 4.5))):
        assert scanned.shape == (2, 5, 6, 5)
        np.testing.assert_allclose(scanned, looped, atol=2e-5)
    assert fraqat_jax.nn.bits_of(qscan)["transformer_blocks.stacks.0.block.attn.to_q"] == 4.0


def _program_size(scan_layers, num_layers):
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                  num_attention_heads=2, num_embeds_ada_norm=10)
    model = nnx.eval_shape(lambda: DiTTransformer2DModel(config, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                                         remat=True))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 4, 8, 8), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    grad = jax.grad(lambda s, *a: jnp.sum(nnx.merge(graphdef, s)(*a)))
    return len(jax.jit(grad).lower(state, x, t, y).as_text())


def test_program_does_not_grow_with_depth():
    assert _program_size(True, 8) < 1.05 * _program_size(True, 2)
    assert _program_size(False, 8) > 2 * _program_size(False, 2)


def test_bad_options_are_rejected_with_the_allowed_values():
    config = dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=4)
    with pytest.raises(ValueError, match="remat='fast' is not allowed.*dots_saveable"):
        DiTTransformer2DModel(config, rngs=nnx.Rngs(0), remat="fast")
    with pytest.raises(ValueError, match="attention='splash' is not allowed.*'auto', 'xla', 'flash'"):
        DiTTransformer2DModel(config, rngs=nnx.Rngs(0), attention="splash")
