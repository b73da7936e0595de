"""The cached decoder (``models.gemma2`` cache + ``models.sampler``) against transformers' ``generate``
on tiny random Gemma-2s: greedy tokens equal and the logits of every step close, with left-padded
batches, outputs past the sliding window, scanned layers and bf16 with 27B-shaped scalars."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from fraqat_jax.models import from_transformers
from fraqat_jax.models.sampler import Sampler, SamplerError, filter_logits

CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
              max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _reference(tmp_path, seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**CONFIG, **overrides},
                                                                   attn_implementation="eager")).eval()
    with torch.no_grad():  # weights scaled up and random norms: next-token distributions far from uniform
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape))
            else:
                p.mul_(8.0)
    ref.save_pretrained(tmp_path)
    return ref.to(dtype)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The seed-0 reference, its folder, our port and one sampler shared by the tests (one compilation)."""
    folder = tmp_path_factory.mktemp("tiny_gemma2")
    ref = _reference(folder)
    model = from_transformers(str(folder))
    return {"ref": ref, "folder": str(folder), "model": model,
            "sampler": Sampler(model, eos_ids=(), length_multiple=8)}  # no end token: every row runs every step


def _prompts():
    rng = np.random.default_rng(1)
    lengths = [7, 3, 5]
    return [[2, *rng.integers(3, 61, n - 1).tolist()] for n in lengths]


def _transformers_generate(ref, prompts, new):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, width:].numpy(), torch.stack(out.logits, 1).float().numpy()


NEW = 14  # 7 + 14 positions: far past the sliding window of 4


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_tokens_and_step_logits_equal_transformers_generate_on_a_left_padded_batch(tiny, scan):
    prompts, new = _prompts(), NEW
    want_tokens, want_logits = _transformers_generate(tiny["ref"], prompts, new)
    sampler = tiny["sampler"]
    if scan:
        sampler = Sampler(from_transformers(tiny["folder"], scan_layers=True), eos_ids=(), length_multiple=8)
    rows = sampler.generate_ids(prompts, max_new_tokens=new, keep_logits=True)
    for r, row in enumerate(rows):
        np.testing.assert_array_equal(row["tokens"], want_tokens[r])
        scale = np.abs(want_logits[r]).max()
        np.testing.assert_allclose(row["step_logits"], want_logits[r], atol=1e-4 * scale, rtol=0)


def test_a_padded_row_decodes_what_it_decodes_alone(tiny):
    # the sliding window masked by stored positions: a row with 4 pads must not see 4 keys more
    prompts = _prompts()
    batch = tiny["sampler"].generate_ids(prompts, max_new_tokens=NEW, keep_logits=True)
    single = Sampler(tiny["model"], eos_ids=(), length_multiple=1)
    for prompt, row in zip(prompts, batch):
        alone = single.generate_ids([prompt], max_new_tokens=NEW, keep_logits=True)[0]
        assert row["tokens"] == alone["tokens"]
        np.testing.assert_allclose(row["step_logits"], alone["step_logits"], atol=1e-5 * np.abs(alone["step_logits"]).max())


def test_end_tokens_stop_a_row_and_greedy_stops_as_transformers(tmp_path):
    ref = _reference(tmp_path, seed=3)
    prompts = _prompts()
    free, _ = _transformers_generate(ref, prompts, 12)
    end = int(free[0, 4])  # make the fifth greedy token of row 0 the end token
    model = from_transformers(str(tmp_path))
    rows = Sampler(model, eos_ids=(end,), length_multiple=8).generate_ids(prompts, max_new_tokens=12)
    for r, row in enumerate(rows):
        hits = [i for i, t in enumerate(free[r]) if t == end]
        assert row["tokens"] == free[r][:hits[0] if hits else 12].tolist()
    assert len(rows[0]["tokens"]) <= 4


def test_bf16_logits_follow_transformers_in_bf16_with_27b_scalars(tmp_path):
    # query_pre_attn_scalar 144 (27B's). bf16 carries 8 significant bits: each rounding of the
    # residual stream moves logits by up to ~0.4 %, a few layers' worth stays under 5 % of the range.
    overrides = dict(query_pre_attn_scalar=144, hidden_size=48, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2)
    ref = _reference(tmp_path, seed=5, dtype=torch.bfloat16, **overrides)
    prompts = _prompts()
    want_tokens, want = _transformers_generate(ref, prompts, 4)
    model = from_transformers(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rows = Sampler(model, eos_ids=(), length_multiple=8).generate_ids(prompts, max_new_tokens=4, keep_logits=True)
    for r, row in enumerate(rows):
        assert np.abs(row["step_logits"][0] - want[r][0]).max() < 0.05 * np.abs(want[r][0]).max()


def test_bf16_attention_scales_its_scores_by_the_exact_constant():
    # Identity q/k/o projections, position 0 (no rotation) and values v_s = e_s, so the output row t
    # is the bf16 probabilities p_t themselves and the scores are exact integers: the probabilities
    # must equal the float64 ones rounded once to bf16 (a float32 softmax lands on the other side of
    # a rounding boundary rarely: at most one in 16 here). A scale rounded to bf16 (1/12 -> 0.0835,
    # 0.2 % too large) tilts every row by several bf16 steps.
    from flax import nnx

    from fraqat_jax.models.gemma2 import Gemma2Attention, rotary_tables

    cfg = dict(CONFIG, hidden_size=16, head_dim=16, num_attention_heads=1, num_key_value_heads=1,
               query_pre_attn_scalar=144, attn_logit_softcapping=50.0, attention_bias=False, initializer_range=0.02,
               layer_types=None, num_hidden_layers=1)
    attn = Gemma2Attention(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    values = np.zeros((16, 16))
    values[8 + np.arange(8), np.arange(8)] = 1.0  # v_s = e_s from the one-hot part of x
    for proj, kernel in ((attn.q_proj, np.eye(16)), (attn.k_proj, np.eye(16)), (attn.v_proj, values),
                         (attn.o_proj, np.eye(16))):
        proj.kernel[...] = jnp.asarray(kernel, jnp.bfloat16)
    n = 8
    x = np.zeros((n, 16))
    x[:, :8] = np.random.default_rng(0).integers(-4, 5, (n, 8))
    x[np.arange(n), 8 + np.arange(n)] = 1.0
    cos, sin = rotary_tables(jnp.zeros((1, n), jnp.int32), 16, 10000.0)
    got = np.asarray(attn(jnp.asarray(x[None], jnp.bfloat16), cos, sin, None, jnp.int32(2**30)).astype(jnp.float32))
    scores = 50.0 * np.tanh(x @ x.T / 12.0 / 50.0) + np.triu(np.full((n, n), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)).astype(ml_dtypes.bfloat16).astype(np.float32)
    got = got[0, :, :n]
    mismatched = got != want
    assert mismatched.sum() <= n * n // 16, (got, want)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=0)  # one bf16 step at most


def test_the_embedding_normalizer_is_rounded_to_the_weights_dtype():
    from flax import nnx

    from fraqat_jax.models.gemma2 import Gemma2ForCausalLM

    model = Gemma2ForCausalLM(dict(CONFIG, hidden_size=48, head_dim=16), rngs=nnx.Rngs(0), dtype=jnp.float32,
                              param_dtype=jnp.bfloat16)
    ids = jnp.asarray([[3, 7, 11]])
    table = np.asarray(model.model.embed_tokens.embedding[...].astype(jnp.float32))
    want = table[[3, 7, 11]] * float(ml_dtypes.bfloat16(np.sqrt(48.0)))  # 6.9375, not 6.9282
    np.testing.assert_array_equal(np.asarray(model.model.embed(ids))[0], want.astype(np.float32))


def test_filter_logits_keeps_the_top_k_and_the_top_p_mass():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keep = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, 1.0, **kw)))[0].tolist()  # noqa: E731
    assert keep(top_k=2, top_p=1.0) == [True, True, False, False]
    assert keep(top_k=0, top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7: the second one is needed
    assert keep(top_k=0, top_p=0.5) == [True, False, False, False]
    assert keep(top_k=0, top_p=0.96) == [True, True, True, True]
    assert keep(top_k=3, top_p=0.9) == [True, True, True, False]


def test_sampling_draws_from_the_filtered_distribution_and_repeats_with_the_seed(tiny):
    sampler, prompts = tiny["sampler"], _prompts()
    kw = dict(max_new_tokens=NEW, keep_logits=True)
    a = sampler.generate_ids(prompts, temperature=1.0, top_k=3, seed=4, **kw)
    again = sampler.generate_ids(prompts, temperature=1.0, top_k=3, seed=4, **kw)
    other = sampler.generate_ids(prompts, temperature=1.0, top_k=3, seed=5, **kw)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in again]
    assert [r["tokens"] for r in a] != [r["tokens"] for r in other]
    greedy = sampler.generate_ids(prompts, **kw)
    assert [r["tokens"] for r in a] != [r["tokens"] for r in greedy]
    for row in a:  # every draw among the 3 largest logits of its step
        top3 = np.argsort(-row["step_logits"], axis=-1)[:, :3]
        assert all(t in top3[i] for i, t in enumerate(row["tokens"]))


def test_bad_options_and_prompts_name_the_value(tiny):
    sampler = tiny["sampler"]
    for kwargs, match in [(dict(top_p=2.0), "top_p=2.0"), (dict(temperature=-1.0), "temperature=-1.0"),
                          (dict(top_k=-2), "top_k=-2"), (dict(max_new_tokens=0), "max_new_tokens=0")]:
        with pytest.raises(SamplerError, match=match):
            sampler.generate_ids([[2, 5]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(SamplerError, match="64 tokens, longer than the cache"):
        sampler.generate_ids([[2] * 64], max_new_tokens=2)
    with pytest.raises(SamplerError, match="empty"):
        sampler.generate_ids([[]], max_new_tokens=2)


GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
                  "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
                  "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def test_chat_template_and_end_tokens_follow_transformers(tmp_path):
    import json

    from text_fixtures import build_tokenizer

    from fraqat_jax.models.sampler import apply_chat_template, chat_template, end_token_ids

    tok = build_tokenizer()
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = GEMMA_TEMPLATE
    fast.save_pretrained(tmp_path)
    messages = [{"role": "user", "content": " Is the sky blue? "}]
    want = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = chat_template(str(tmp_path))
    assert template == GEMMA_TEMPLATE
    assert apply_chat_template(template, messages, bos_token="<bos>") == want
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    turn = tok.token_to_id("<end_of_turn>")
    assert end_token_ids(str(tmp_path), {"eos_token_id": 1}, tok) == (1, 7, turn)
    (tmp_path / "generation_config.json").unlink()
    assert end_token_ids(str(tmp_path), {"eos_token_id": 1}, tok) == (1, turn)
