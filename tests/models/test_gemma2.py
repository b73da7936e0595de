"""Gemma-2 port (fraqat_jax.models.gemma2, models.transformers_folder) against transformers'
``Gemma2ForCausalLM`` in float32: tiny random configs built in torch, saved with
``save_pretrained`` and loaded with ``from_transformers``; logits within 1e-4 x max|logits| with left
padding and sequences longer than the sliding window."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from parity_utils import randomize
from safetensors.numpy import load_file, save_file

import fraqat_jax
from fraqat_jax.models import (PRESETS, CheckpointMismatchError, Gemma2ForCausalLM, count_params, from_transformers,
                               positions_from_mask, save_transformers, to_transformers_state_dict)
from fraqat_jax.models.attention import NO_WINDOW, dot_product_attention, splash_attention
from fraqat_jax.models.scan import ScannedBlocks
from fraqat_jax.nn.graph import quantized_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# A: default layer kinds (sliding on 0 and 2) over an odd count, grouped heads, both soft caps,
#    query_pre_attn_scalar != head_dim, tied embeddings, sharded files with an index.
# B: custom layer kinds, one key-value head, no soft caps, untied LM head, q/k/v/o biases,
#    head_dim != hidden / heads, another rotary base.
CONFIGS = {
    "A": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=5,
              attn_logit_softcapping=5.0, final_logit_softcapping=8.0, max_position_embeddings=64),
    "B": dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
              layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
              attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False,
              attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
              max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (torch model, transformers folder)} for CONFIGS, random weights (norm scales included)."""
    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        config = transformers.Gemma2Config(**kwargs, attn_implementation="eager")
        model = transformers.Gemma2ForCausalLM(config).eval()
        randomize(model, seed=i)
        if config.tie_word_embeddings:
            model.tie_weights()
        folder = tmp_path_factory.mktemp(f"gemma2_{name}")
        model.save_pretrained(folder, max_shard_size="20KB" if name == "A" else "50MB")
        out[name] = (model, folder)
    return out


def _batch(vocab, length, seed=0):
    """Two sequences of ``length`` tokens, the second left-padded by 4 (mask 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


@jax.jit
def _logits(model, ids, mask=None, positions=None):
    return model(ids, attention_mask=mask, position_ids=positions)


def _reference(model, ids, mask, position_ids=None):
    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.tensor(np.asarray(position_ids))}
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


def _assert_close(ours, ref, rel=1e-4):
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape
    err, tol = float(np.abs(ours - ref).max()), rel * float(np.abs(ref).max())
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_left_padding_past_the_window(folders, name):
    torch_model, folder = folders[name]
    if name == "A":
        assert (folder / "model.safetensors.index.json").is_file()  # sharded files, read through the index
    model = from_transformers(folder)
    assert isinstance(model, Gemma2ForCausalLM)
    cfg = CONFIGS[name]
    ids, mask = _batch(cfg["vocab_size"], 13)  # 13 tokens: over twice the windows (5, 3)
    logits = _logits(model, ids, mask)
    assert logits.shape == (2, 13, cfg["vocab_size"]) and logits.dtype == jnp.float32
    _assert_close(logits, _reference(torch_model, ids, mask))  # every row, padded ones included
    # the positions transformers' generate uses: the padded prompt computes what the unpadded one does
    positions = positions_from_mask(mask)
    np.testing.assert_array_equal(positions[1], [0, 0, 0, 0] + list(range(9)))
    generating = _logits(model, ids, mask, positions)
    _assert_close(generating, _reference(torch_model, ids, mask, positions))
    _assert_close(generating[1:, 4:], np.asarray(_logits(model, ids[1:, 4:])))
    # no mask at all
    _assert_close(_logits(model, ids), _reference(torch_model, ids, np.ones_like(mask)))


def test_scan_layers_equals_the_unrolled_model_and_keeps_layer_names(folders):
    torch_model, folder = folders["B"]
    loop = from_transformers(folder)
    scan = from_transformers(folder, scan_layers=True, remat=True)
    layers = scan.model.layers
    # mixed layer kinds still form one stack: the kind is a window size picked per layer
    assert isinstance(layers, ScannedBlocks) and [(s.start, s.length) for s in layers.stacks] == [(0, 4)]
    assert layers.stacks[0].block.self_attn.q_proj.kernel.shape == (4, 24, 32)
    ids, mask = _batch(61, 11, seed=1)

    def loss(model):
        return jnp.mean(jnp.square(model(ids, attention_mask=mask)))

    value_and_grad = jax.jit(nnx.value_and_grad(loss))
    value_loop, grads_loop = value_and_grad(loop)
    value_scan, grads_scan = value_and_grad(scan)
    np.testing.assert_allclose(value_scan, value_loop, rtol=1e-5)
    g_loop = grads_loop["model"]["layers"][2]["self_attn"]["k_proj"]["kernel"][...]
    g_scan = grads_scan["model"]["layers"]["stacks"][0]["block"]["self_attn"]["k_proj"]["kernel"][...][2]
    np.testing.assert_allclose(g_scan, g_loop, rtol=1e-4, atol=1e-6 * float(np.abs(g_loop).max()))
    # export: transformers' keys and values, per layer
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    exported = to_transformers_state_dict(scan)
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_saved_folder_loads_in_transformers(folders, tmp_path):
    torch_model, folder = folders["B"]  # untied head, biases, custom layer kinds and rotary base
    model = from_transformers(folder, scan_layers=True)
    out = save_transformers(model, tmp_path / "out", tokenizer_from=folder)
    assert (out / "generation_config.json").is_file()
    reloaded = transformers.Gemma2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch(61, 9, seed=2)
    _assert_close(_logits(model, ids, mask), _reference(reloaded, ids, mask))
    # bf16 files: the dtype recorded in config.json, the values rounded once
    save_transformers(model, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = load_file(tmp_path / "bf16" / "model.safetensors")
    np.testing.assert_array_equal(exported["model.norm.weight"],
                                  torch_model.model.norm.weight.detach().numpy().astype(ml_dtypes.bfloat16))
    # a tied model has no lm_head.weight of its own
    tied = to_transformers_state_dict(from_transformers(folders["A"][1]))
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied


def test_loading_is_strict_and_names_every_bad_key(folders, tmp_path):
    _, folder = folders["B"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = dict(load_file(folder / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors.pop("lm_head.weight")  # untied: the head is a parameter of its own
    tensors["model.layers.9.self_attn.q_proj.weight"] = np.zeros((32, 24), np.float32)
    tensors["model.norm.weight"] = np.zeros((25,), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as info:
        from_transformers(tmp_path)
    error = info.value
    assert error.missing == ["lm_head.weight", "model.layers.1.mlp.up_proj.weight"]
    assert error.unexpected == ["model.layers.9.self_attn.q_proj.weight"]
    assert error.mismatched == [("model.norm.weight", (25,), (24,))]
    assert "model.layers.1.mlp.up_proj.weight" in str(error)
    # a tied model's files may carry lm_head.weight (older save_pretrained): it is skipped
    _, tied = folders["A"]
    (tmp_path / "tied").mkdir()
    (tmp_path / "tied" / "config.json").write_text((tied / "config.json").read_text())
    tensors = {}
    for file in tied.glob("*.safetensors"):
        tensors.update(load_file(file))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    from_transformers(tmp_path / "tied")
    # not a Gemma-2 folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*supported: Gemma2ForCausalLM"):
        from_transformers(tmp_path / "other")


def test_quantize_model_takes_the_seven_projections_and_leaves_the_embedding(folders):
    _, folder = folders["A"]
    model = from_transformers(folder, scan_layers=True)
    ids, mask = _batch(97, 8, seed=3)
    before = np.asarray(_logits(model, ids, mask))
    fraqat_jax.quantize_model(model, fraqat_jax.Rule(r".*", weight_bits=4, act_bits=8))
    names = sorted(name for name, _ in quantized_layers(model))
    projections = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                   "self_attn.q_proj", "self_attn.v_proj"]
    assert names == [f"model.layers.stacks.0.block.{p}" for p in projections]
    assert type(model.model.embed_tokens) is nnx.Embed
    after = np.asarray(_logits(model, ids, mask))
    assert np.isfinite(after).all() and not np.allclose(after, before)


def test_bf16_compute_stays_close_to_float32(folders):
    torch_model, folder = folders["A"]
    model = from_transformers(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask = _batch(97, 13, seed=4)
    logits = _logits(model, ids, mask)
    assert logits.dtype == jnp.bfloat16
    assert model.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    _assert_close(logits, _reference(torch_model, ids, mask), rel=0.05)


@pytest.mark.parametrize("attention", ["auto", "flash"])
def test_kernel_options_compute_the_xla_path_on_cpu(folders, attention):
    _, folder = folders["A"]
    ids, mask = _batch(97, 13, seed=5)
    ours = _logits(from_transformers(folder, attention=attention), ids, mask)
    np.testing.assert_array_equal(ours, _logits(from_transformers(folder), ids, mask))


@pytest.mark.parametrize("window", [None, 5])
def test_splash_kernel_equals_the_xla_path_in_interpret_mode(window):
    """The TPU kernel's program (local window, soft cap, grouped heads, padding as segment ids, token
    and head axes padded to the tile) run by Pallas' interpreter on the CPU."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               ((2, 20, 4, 8), (2, 20, 2, 8), (2, 20, 2, 8)))
    valid = np.ones((2, 20), bool)
    valid[1, :6] = False
    out = splash_attention(q, k, v, jnp.asarray(valid), window=window, softcap=3.0, interpret=True)
    ref = dot_product_attention(q, k, v, jnp.asarray(valid)[:, None, None, :], "xla", scale=1.0, softcap=3.0,
                                window=window or NO_WINDOW)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=1e-5, atol=1e-5)


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="layer_types must hold 2 entries"):
        Gemma2ForCausalLM(dict(CONFIGS["A"], num_hidden_layers=2, layer_types=["full_attention"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_type 'default' only, got 'linear'"):
        Gemma2ForCausalLM(dict(CONFIGS["A"], rope_parameters={"rope_type": "linear", "factor": 2.0}),
                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention='fast' is not allowed"):
        Gemma2ForCausalLM(CONFIGS["A"], rngs=nnx.Rngs(0), attention="fast")


def test_presets_have_the_published_sizes():
    """Parameter counts of the presets against transformers' model of the same config (on the meta
    device: no memory spent)."""
    for name in ("gemma-2-2b", "gemma-2-27b"):
        _, config = PRESETS[name]
        ours = count_params(nnx.eval_shape(lambda: Gemma2ForCausalLM(config, rngs=nnx.Rngs(0))))
        with torch.device("meta"):
            reference = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**config))
        assert ours == sum(p.numel() for p in reference.parameters()), name
    assert ours == 27_227_128_320  # gemma-2-27b


_TPU_SCRIPT = textwrap.dedent(r"""
    import json, os
    os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                      ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.experimental.topologies import get_topology_desc
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fraqat_jax.models import Gemma2ForCausalLM

    devices = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False)).devices
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
    config = dict(vocab_size=300, hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128, sliding_window=256)
    model = nnx.eval_shape(lambda: Gemma2ForCausalLM(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat=True,
                                                      scan_layers=True, attention="flash"))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), state)
    tokens = jax.ShapeDtypeStruct((4, 384), jnp.int32, sharding=NamedSharding(mesh, P("data")))

    def loss(s, ids, mask):
        logits = nnx.merge(graphdef, s)(ids, attention_mask=mask)
        return jnp.mean(jnp.square(logits.astype(jnp.float32)))

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss)).lower(state, tokens, tokens).compile().as_text()
    print("RESULT " + json.dumps([text.count("tpu_custom_call"), text.replace(" ", "").count("384,384]")]))
""")


@pytest.mark.slow
def test_splash_kernel_compiles_ahead_of_time_for_a_tpu_topology():
    """attention='flash' on a TPU program (v5e 2x2, batch over data, heads over tensor, scanned and
    rematerialised layers of both kinds, padding mask): the splash kernels (causal and local,
    forward and backward) are in the program and no [L, L] score array is."""
    pytest.importorskip("libtpu", reason="the TPU AOT compiler ships in libtpu (pip install 'fraqat_jax[tpu]')")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _TPU_SCRIPT], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    kernels, score_arrays = json.loads(lines[-1][len("RESULT "):])
    assert kernels >= 6 and score_arrays == 0
