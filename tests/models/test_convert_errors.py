"""Malformed weights: every corruption gives a one-line CheckpointFileError naming the file (and the
tensor at fault); bfloat16 still loads; files are read tensor by tensor, not whole."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import save_file as save_flax
from safetensors.numpy import save_file as save_numpy

from fraqat_jax.models import (
    CheckpointFileError,
    DiTTransformer2DModel,
    from_diffusers,
    to_diffusers_state_dict,
)
from fraqat_jax.models.convert import read_safetensors

TINY_DIT = {"_class_name": "DiTTransformer2DModel", "sample_size": 4, "patch_size": 2, "in_channels": 2,
            "out_channels": 4, "num_layers": 1, "attention_head_dim": 4, "num_attention_heads": 2,
            "num_embeds_ada_norm": 3, "norm_num_groups": 2}


def _layout(raw: bytes):
    """(header dict, data bytes) of a safetensors file, parsed by the format's spec."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.fixture
def good_file(tmp_path):
    """A valid two-tensor file written by the library: 'bias' [3] then 'weight' [4, 8] (float32)."""
    path = tmp_path / "good.safetensors"
    save_numpy({"bias": np.arange(3, dtype=np.float32), "weight": np.ones((4, 8), np.float32)}, str(path))
    return path.read_bytes()


def _corrupt(kind: str, raw: bytes) -> bytes:
    header, data = _layout(raw)
    last = max(header, key=lambda k: header[k]["data_offsets"][1] if k != "__metadata__" else -1)
    if kind == "huge header length":
        return struct.pack("<Q", 2**62) + raw[8:]
    if kind == "empty file":
        return b""
    if kind == "truncated data":
        return raw[:-10]
    if kind == "out-of-range offsets":
        start, _ = header[last]["data_offsets"]
        return _with_header({**header, last: {**header[last], "data_offsets": [start, start + 10**6]}}, data)
    if kind == "shape does not fit offsets":
        return _with_header({**header, last: {**header[last], "shape": [4, 9]}}, data)
    if kind == "non-JSON header":
        return struct.pack("<Q", 12) + b"{not json!!}" + data
    raise AssertionError(kind)


# (corruption, text the message must hold, the tensor it must name or None when no tensor is at fault)
CASES = [
    ("huge header length", "header too large", None),
    ("empty file", "header too small", None),
    ("truncated data", "truncated", "weight"),
    ("out-of-range offsets", "reach past", "weight"),
    ("shape does not fit offsets", "needs 144 bytes", "weight"),
    ("non-JSON header", "invalid JSON", None),
]


@pytest.mark.parametrize("kind,says,tensor", CASES, ids=[c[0] for c in CASES])
def test_each_corruption_is_a_one_line_error_naming_file_and_tensor(kind, says, tensor, good_file, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_corrupt(kind, good_file))
    with pytest.raises(CheckpointFileError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and says in message, message
    if tensor:
        assert repr(tensor) in message, message


def test_corrupt_teacher_folder_fails_before_building_anything_big(tmp_path, good_file):
    """The user's path: ``from_diffusers`` on a folder whose weights are truncated."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_DIT))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(_corrupt("truncated data", good_file))
    with pytest.raises(CheckpointFileError, match=f"{weights}.*'weight'"):
        from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text("{'_class_name': no json")
    with pytest.raises(CheckpointFileError, match="config.json is not valid JSON"):
        from_diffusers(tmp_path)


def test_bf16_checkpoint_loads_bit_exact(tmp_path):
    model = DiTTransformer2DModel(TINY_DIT, rngs=nnx.Rngs(0))
    ref = {k: jnp.asarray(v, jnp.bfloat16) for k, v in to_diffusers_state_dict(model).items()}
    (tmp_path / "config.json").write_text(json.dumps(TINY_DIT))
    save_flax(ref, str(tmp_path / "diffusion_pytorch_model.safetensors"))  # the library's own writer

    read = read_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")
    name = "transformer_blocks.0.attn1.to_q.weight"
    assert read[name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(read[name].view(np.uint16), np.asarray(ref[name]).view(np.uint16))

    loaded = from_diffusers(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = loaded.transformer_blocks[0].attn1.to_q.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel).view(np.uint16), np.asarray(ref[name]).T.view(np.uint16))


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_reading_holds_one_tensor_not_the_whole_file(tmp_path):
    """Process anonymous memory while reading a 128 MiB file tensor by tensor stays well under the
    file's size (an eager reader holding the file, or all its tensors, would need >= 128 MiB).
    File pages of the memory map are not anonymous memory, so they do not count."""
    n, per = 8, 4 * 1024 * 1024  # 8 tensors of 4 Mi float32 = 16 MiB each
    path = tmp_path / "big.safetensors"
    save_numpy({f"t{i}": np.full(per, i, np.float32) for i in range(n)}, str(path))
    save_numpy({"warm": np.zeros(4, np.float32)}, str(tmp_path / "warm.safetensors"))
    read_safetensors(tmp_path / "warm.safetensors")["warm"]  # JAX's CPU client starts on first use

    base = _rss_anon_bytes()
    ckpt = read_safetensors(path)
    peak = _rss_anon_bytes()
    for i in range(n):
        value = ckpt[f"t{i}"]
        assert value.shape == (per,) and value[0] == i and value[-1] == i
        peak = max(peak, _rss_anon_bytes())
        del value
    file_size = path.stat().st_size
    assert peak - base < file_size / 2, f"{(peak - base) / 2**20:.0f} MiB held while reading a {file_size / 2**20:.0f} MiB file"
