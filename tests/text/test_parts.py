"""Gemma-2 in parts by layers (``fraqat_jax.text.parts``): chained, the parts compute the whole
model's cached step and its text-encoder forward (float, tiny random model, JAX only)."""

import numpy as np
import pytest
from flax import nnx

from fraqat_jax.deploy.text import step_tables
from fraqat_jax.models.gemma2 import Gemma2ForCausalLM
from fraqat_jax.text.kv_step import Gemma2KVStep
from fraqat_jax.text.parts import Gemma2EncoderPart, Gemma2KVPart, host_embed, host_rotary, split_layers

CONFIG = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=6,
              query_pre_attn_scalar=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              tie_word_embeddings=True, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def model():
    m = Gemma2ForCausalLM(CONFIG, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for _, norm in nnx.iter_graph(m):  # transformers starts norms at zero: random ones so they count
        if type(norm).__name__ == "Gemma2RMSNorm":
            norm.scale.value = 0.3 * rng.standard_normal(norm.scale.value.shape).astype(np.float32)
    return m


def test_split_layers():
    assert split_layers(26, 4) == [(0, 7), (7, 14), (14, 20), (20, 26)]
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for bad in (0, 27, 2.5):
        with pytest.raises(ValueError, match=r"parts must be an integer in \[1, 26\]"):
            split_layers(26, bad)


def _tied_head(model):
    table = np.asarray(model.model.embed_tokens.embedding.value)
    head = nnx.Linear(table.shape[1], table.shape[0], use_bias=False, rngs=nnx.Rngs(0))
    head.kernel.value = table.T.copy()
    return head, table


def test_kv_parts_equal_the_whole_step(model):
    n, c, config = 4, 16, model.config
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CONFIG["vocab_size"], (1, n)).astype(np.int32)
    feeds = {"input_ids": ids, **step_tables(7, n, c, window=CONFIG["sliding_window"], dim=8,
                                             theta=float(config.get("rope_theta", 10000.0)))}
    for i in range(CONFIG["num_hidden_layers"]):
        feeds[f"past_key_{i}_in"] = rng.standard_normal((1, 2, 8, c - n)).astype(np.float32)
        feeds[f"past_value_{i}_in"] = rng.standard_normal((1, 2, c - n, 8)).astype(np.float32)
    want = {k: np.asarray(v) for k, v in Gemma2KVStep(model)(**feeds).items()}
    head, table = _tied_head(model)
    layers = list(model.model.layers)
    x = host_embed(table, ids, CONFIG["hidden_size"])
    got = {}
    for start, stop in split_layers(5, 2) + [(5, 5)]:  # two parts of layers, then the head alone
        last = (start, stop) == (5, 5)
        part = Gemma2KVPart(config, layers[start:stop], start, norm=model.model.norm if last else None,
                            head=head if last else None)
        given = dict(feeds, hidden_states=x) if stop > start else {"hidden_states": x}  # the head reads x alone
        out = {k: np.asarray(v) for k, v in part(**given).items()}
        x = out.pop("hidden_states_out", None)
        got.update(out)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max(), err_msg=k)


def test_encoder_parts_equal_the_text_encoder(model):
    length, config = 10, model.config
    ids = np.random.default_rng(2).integers(0, CONFIG["vocab_size"], (1, length)).astype(np.int32)
    mask = np.zeros((1, length), np.float32)
    mask[0, :7] = 1  # three padding tokens at the end
    want = np.asarray(model.model(ids, mask))
    x = host_embed(np.asarray(model.model.embed_tokens.embedding.value), ids, CONFIG["hidden_size"])
    cos, sin = host_rotary(np.arange(length), config)
    layers = list(model.model.layers)
    for start, stop in split_layers(5, 3):
        part = Gemma2EncoderPart(config, layers[start:stop], start, norm=model.model.norm if stop == 5 else None)
        x = np.asarray(part(x, mask, cos, sin))
    np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_part_errors(model):
    with pytest.raises(ValueError, match="outside the model's 5 layers"):
        Gemma2KVPart(model.config, list(model.model.layers)[:2], 4)
    with pytest.raises(ValueError, match="needs both the final norm and the head"):
        Gemma2KVPart(model.config, [], 5, norm=model.model.norm)
