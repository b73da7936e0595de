"""The diffusers checkpoint loader: folder layouts, strict key matching, errors, dtypes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import (  # noqa: E402
    MODEL_CLASSES,
    CheckpointMismatchError,
    DiTTransformer2DModel,
    from_diffusers,
    to_diffusers_state_dict,
)
from fraqat_jax.models.convert import load_checkpoint, read_safetensors  # noqa: E402

TINY_DIT = dict(sample_size=4, patch_size=2, in_channels=2, out_channels=4, num_layers=1,
                attention_head_dim=4, num_attention_heads=2, num_embeds_ada_norm=3)


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A saved random diffusers DiT and its state dict as float32 numpy."""
    path = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**TINY_DIT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path, {k: v.numpy() for k, v in model.state_dict().items()}


def _copy_with(src, dst, tensors):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_numpy(tensors, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_values_land_transposed_and_round_trip(tiny_dit):
    path, ref = tiny_dit
    model = from_diffusers(path)
    block = model.transformer_blocks[0]
    np.testing.assert_array_equal(block.attn1.to_q.kernel[...], ref["transformer_blocks.0.attn1.to_q.weight"].T)
    np.testing.assert_array_equal(
        model.pos_embed.proj.kernel[...], ref["pos_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        block.norm1.emb.class_embedder.embedding_table.embedding[...],
        ref["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
    )
    back = to_diffusers_state_dict(model)
    assert sorted(back) == sorted(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_strict_loader_lists_missing_unexpected_and_mismatched_together(tiny_dit, tmp_path):
    path, ref = tiny_dit
    tensors = dict(ref)
    del tensors["proj_out_2.bias"]
    tensors["transformer_blocks.0.attn1.to_z.weight"] = np.zeros((8, 8), np.float32)
    tensors["transformer_blocks.0.ff.net.2.weight"] = np.zeros((8, 31), np.float32)
    bad = _copy_with(path, tmp_path / "bad", tensors)
    with pytest.raises(CheckpointMismatchError) as info:
        from_diffusers(bad)
    err = info.value
    assert err.missing == ["proj_out_2.bias"]
    assert err.unexpected == ["transformer_blocks.0.attn1.to_z.weight"]
    assert err.mismatched == [("transformer_blocks.0.ff.net.2.weight", (8, 31), (8, 32))]
    message = str(err)
    for name in ("proj_out_2.bias", "attn1.to_z.weight", "ff.net.2.weight", "(8, 31)", "(8, 32)"):
        assert name in message


def test_unsupported_class_names_it_and_lists_supported(tiny_dit, tmp_path):
    path, ref = tiny_dit
    other = _copy_with(path, tmp_path / "other", {"x": np.zeros(1, np.float32)})
    config = json.loads((other / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="UNet2DConditionModel") as info:
        from_diffusers(other)
    for name in MODEL_CLASSES:
        assert name in str(info.value)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        from_diffusers(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_diffusers(tmp_path)


def test_sharded_and_pipeline_folders(tiny_dit, tmp_path):
    path, ref = tiny_dit
    model = diffusers.DiTTransformer2DModel.from_pretrained(path)
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "transformer", max_shard_size="5KB")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    shards = sorted(p.name for p in (pipeline / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and list((pipeline / "transformer").glob("*.index.json"))
    assert sorted(load_checkpoint(pipeline / "transformer")) == sorted(ref)
    loaded = from_diffusers(pipeline)
    assert isinstance(loaded, DiTTransformer2DModel)
    np.testing.assert_array_equal(loaded.proj_out_2.kernel[...], ref["proj_out_2.weight"].T)
    # a shard named by the index but absent is reported by name
    (pipeline / "transformer" / shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[0]):
        from_diffusers(pipeline)


def test_reads_bf16_and_fp16_without_torch_and_casts(tiny_dit, tmp_path):
    path, ref = tiny_dit
    values = torch.randn(3, 5)
    save_torch({"a": values.to(torch.bfloat16), "b": values.to(torch.float16)}, str(tmp_path / "t.safetensors"))
    read = read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(read["a"].astype(np.float32), values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(read["b"].astype(np.float32), values.to(torch.float16).float().numpy())

    half = tmp_path / "half"
    model = diffusers.DiTTransformer2DModel.from_pretrained(path).to(torch.bfloat16)
    model.save_pretrained(half)
    loaded = from_diffusers(half, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = loaded.transformer_blocks[0].attn1.to_k.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    expected = model.transformer_blocks[0].attn1.to_k.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected)
    out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 2, 4, 4)), jnp.ones(1), jnp.zeros(1, jnp.int32)), loaded)
    assert out.shape == (1, 4, 4, 4) and out.dtype == jnp.bfloat16


def test_loaded_model_is_concrete_and_jittable(tiny_dit):
    path, _ = tiny_dit
    model = from_diffusers(path)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert model.config["_class_name"] == "DiTTransformer2DModel" and model.config["num_layers"] == 1
