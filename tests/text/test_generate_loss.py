"""The text family's pieces against independent references: the KL / MSE losses against numpy,
greedy continuations against transformers' ``generate`` and LLM-QAT's data-free sequences against
transformers' logits, on a tiny random Gemma-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fraqat_jax.models import from_transformers
from fraqat_jax.text.generate import datafree_sequences, greedy_continue
from fraqat_jax.text.loss import logits_mse, next_token_kl

CONFIG = dict(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
              max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our port) of one random tiny Gemma-2 (weights scaled up so that the
    next-token distributions are far from uniform)."""
    torch.manual_seed(0)
    ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**CONFIG, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
    folder = tmp_path_factory.mktemp("tiny_gemma2")
    ref.save_pretrained(folder)
    return ref, from_transformers(folder)


def test_kl_and_mse_equal_the_formulas_on_masked_positions():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7)) * 3
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    q = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(next_token_kl(jnp.asarray(t), jnp.asarray(s), jnp.asarray(mask)),
                               (kl * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(next_token_kl(jnp.asarray(t), jnp.asarray(s)), kl.mean(), rtol=1e-5)
    assert float(next_token_kl(jnp.asarray(t), jnp.asarray(t))) == pytest.approx(0.0, abs=1e-6)
    mse = ((s - t) ** 2).mean(-1)
    np.testing.assert_allclose(logits_mse(jnp.asarray(t), jnp.asarray(s), jnp.asarray(mask)),
                               (mse * mask).sum() / mask.sum(), rtol=1e-5)


def test_greedy_continuations_equal_transformers_generate(tiny):
    ref, model = tiny
    prompts = np.random.default_rng(1).integers(3, 53, (3, 5))
    prompts[:, 0] = 2
    ours = jax.jit(lambda p: greedy_continue(model, p, 9))(jnp.asarray(prompts, jnp.int32))
    with torch.no_grad():
        want = ref.generate(torch.tensor(prompts), max_new_tokens=9, min_new_tokens=9, do_sample=False,
                            attention_mask=torch.ones(3, 5, dtype=torch.long), pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(ours), want)  # 14 tokens: past the sliding window of 4


def test_datafree_sequences_follow_llm_qat(tiny):
    ref, model = tiny
    fn = jax.jit(lambda k: datafree_sequences(model, k, 6, 12, bos=2, vocab_size=53,
                                              excluded=(0, 1, 2)))
    out = fn(jax.random.key(3))
    ids = np.asarray(out["input_ids"])
    assert ids.shape == (6, 12) and (np.asarray(out["attention_mask"]) == 1).all()
    assert (ids[:, 0] == 2).all() and not np.isin(ids[:, 1], [0, 1, 2]).any()
    with torch.no_grad():
        logits = ref(torch.tensor(ids)).logits.numpy()
    # positions 2, 3, 4: the teacher's argmax given the prefix; later ones: drawn from its distribution
    np.testing.assert_array_equal(ids[:, 2:5], logits[:, 1:4].argmax(-1))
    later = logits[:, 4:-1]
    prob = np.exp(later - later.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    drawn = np.take_along_axis(prob, ids[:, 5:, None], -1)[..., 0]
    assert drawn.min() > 1e-4 and (ids[:, 5:] != later.argmax(-1)).any()  # sampled, not greedy
    np.testing.assert_array_equal(np.asarray(fn(jax.random.key(3))["input_ids"]), ids)
    assert not np.array_equal(np.asarray(fn(jax.random.key(4))["input_ids"]), ids)
