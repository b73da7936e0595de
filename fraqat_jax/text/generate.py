"""Fixed-shape generation for training: the sample files' greedy continuations and LLM-QAT's
data-free sequences, through the one decoder (:mod:`fraqat_jax.models.sampler`: the port's key-value
cache, one prefill and one compiled decode loop).

Every function takes ``model`` (the port or its quantized form: ``init_cache`` / ``prefill`` /
``decode_step``) and a ``[B, T]`` buffer whose first ``prompt_len`` tokens are the prompt, and runs
under ``jit`` with ``prompt_len`` traced: the prompt is moved to the right end of the buffer
(left padding, positions from the mask), so one program serves every prompt length.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp

from fraqat_jax.models.sampler import generate_tokens

__all__ = ["GREEDY_FIRST_TOKENS", "continue_tokens", "datafree_prompts", "datafree_sequences", "greedy_continue"]

#: LLM-QAT's recipe: after a random first token, the next few are the teacher's top-1 choice.
GREEDY_FIRST_TOKENS = 3


def continue_tokens(model, input_ids, prompt_len, greedy_until, key):
    """Fills positions ``prompt_len .. T-1`` of ``input_ids`` ``[B, T]`` (what is there is ignored):
    position ``t`` is the argmax of the prediction at ``t - 1`` while ``t < greedy_until``, else a
    draw from its softmax (temperature 1) with ``fold_in(key, t - prompt_len)``. ``prompt_len`` and
    ``greedy_until`` may be traced scalars: one compiled program serves any."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    p = jnp.asarray(prompt_len, jnp.int32)
    where = jnp.arange(t)
    mask = jnp.broadcast_to(where >= t - p, (b, t))
    prompts = jnp.where(mask, jnp.roll(input_ids, t - p, axis=1), 0)
    out = generate_tokens(model, prompts, mask, key, max_new_tokens=t, sample=True,
                          greedy_steps=jnp.asarray(greedy_until, jnp.int32) - p, limit=t - p)
    new = jnp.take(out["tokens"], jnp.clip(where - p, 0, t - 1), axis=1)
    return jnp.where(where[None] < p, input_ids, new)


def greedy_continue(model, prompts, num_new: int):
    """``[B, P + num_new]`` int32: ``prompts`` ``[B, P]`` (no padding) followed by ``num_new`` greedy
    (argmax) tokens."""
    prompts = jnp.asarray(prompts, jnp.int32)
    b, p = prompts.shape
    out = generate_tokens(model, prompts, jnp.ones_like(prompts), jax.random.key(0), max_new_tokens=num_new)
    return jnp.concatenate([prompts, out["tokens"]], axis=1)


def datafree_prompts(key, num: int, seq_len: int, *, bos: int, vocab_size: int, excluded: Iterable[int] = ()):
    """``[num, seq_len]`` int32 buffers for :func:`datafree_sequences`: ``bos``, then a token drawn
    uniformly from the vocabulary without the ``excluded`` ids (special tokens), then zeros."""
    excluded = sorted(set(int(i) for i in excluded))
    forbidden = jnp.zeros((vocab_size,), bool)
    if excluded:
        forbidden = forbidden.at[jnp.asarray(excluded, jnp.int32)].set(True)
    first = jax.random.categorical(key, jnp.where(forbidden, -jnp.inf, 0.0), shape=(num,)).astype(jnp.int32)
    buf = jnp.zeros((num, seq_len), jnp.int32).at[:, 0].set(bos)
    return buf.at[:, 1].set(first) if seq_len > 1 else buf


def datafree_sequences(model, key, num: int, seq_len: int, *, bos: int, vocab_size: int,
                       excluded: Iterable[int] = (), greedy_tokens: int = GREEDY_FIRST_TOKENS):
    """LLM-QAT's data-free text (Liu et al. 2023, section 2.1): ``{"input_ids", "attention_mask"}``
    ``[num, seq_len]`` int32 sampled from the teacher. Position 0 is ``bos``; position 1 a token drawn
    uniformly from the vocabulary without the ``excluded`` ids (:func:`datafree_prompts` with
    ``split(key)[0]``); the next ``greedy_tokens`` positions the teacher's argmax; every later one
    drawn from the teacher's next-token distribution (``split(key)[1]``)."""
    k_first, k_rest = jax.random.split(key)
    buf = datafree_prompts(k_first, num, seq_len, bos=bos, vocab_size=vocab_size, excluded=excluded)
    buf = continue_tokens(model, buf, min(2, seq_len), 2 + greedy_tokens, k_rest)
    return {"input_ids": buf, "attention_mask": jnp.ones_like(buf)}
