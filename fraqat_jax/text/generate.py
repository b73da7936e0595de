"""Token generation with a fixed-shape buffer: greedy continuations and LLM-QAT's data-free sequences.

Every function takes ``logits_fn(input_ids [B, T]) -> logits [B, T, vocab]`` (a causal LM called on
the whole buffer) and runs under ``jit``: the buffer keeps its shape ``[B, T]`` from the first step
to the last, so one program serves every step and every prompt length (no key-value cache: the
models this runs on CPU are tiny, and on an accelerator a window of a few hundred tokens costs a
few forward passes of the batch). Causal attention makes the tokens after position ``t``
irrelevant to the prediction at ``t``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

__all__ = ["GREEDY_FIRST_TOKENS", "continue_tokens", "datafree_prompts", "datafree_sequences", "greedy_continue"]

#: LLM-QAT's recipe: after a random first token, the next few are the teacher's top-1 choice.
GREEDY_FIRST_TOKENS = 3


def continue_tokens(logits_fn: Callable, input_ids, prompt_len, greedy_until, key):
    """Fills positions ``prompt_len .. T-1`` of ``input_ids`` ``[B, T]`` (what is there is ignored):
    position ``t`` is the argmax of the prediction at ``t - 1`` while ``t < greedy_until``, else a
    draw from its softmax (temperature 1) with ``fold_in(key, t)``. ``prompt_len`` and
    ``greedy_until`` may be traced scalars: one compiled program serves any."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    t_total = input_ids.shape[1]

    def body(t, buf):
        logits = jax.lax.dynamic_index_in_dim(logits_fn(buf), t - 1, axis=1, keepdims=False).astype(jnp.float32)
        sampled = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1)
        nxt = jnp.where(t < greedy_until, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt, t, axis=1)

    return jax.lax.fori_loop(jnp.asarray(prompt_len, jnp.int32), t_total, body, input_ids)


def greedy_continue(logits_fn: Callable, prompts, num_new: int):
    """``[B, P + num_new]`` int32: ``prompts`` ``[B, P]`` (no padding) followed by ``num_new`` greedy
    (argmax) tokens."""
    prompts = jnp.asarray(prompts, jnp.int32)
    b, p = prompts.shape
    buf = jnp.concatenate([prompts, jnp.zeros((b, num_new), jnp.int32)], axis=1)
    return continue_tokens(logits_fn, buf, p, p + num_new, jax.random.key(0))


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


def datafree_sequences(logits_fn: Callable, key, num: int, seq_len: int, *, bos: int, vocab_size: int,
                       excluded: Iterable[int] = (), greedy_tokens: int = GREEDY_FIRST_TOKENS):
    """LLM-QAT's data-free text (Liu et al. 2023, section 2.1): ``{"input_ids", "attention_mask"}``
    ``[num, seq_len]`` int32 sampled from the teacher. Position 0 is ``bos``; position 1 a token drawn
    uniformly from the vocabulary without the ``excluded`` ids (:func:`datafree_prompts` with
    ``split(key)[0]``); the next ``greedy_tokens`` positions the teacher's argmax; every later one
    drawn from the teacher's next-token distribution (``split(key)[1]``)."""
    k_first, k_rest = jax.random.split(key)
    buf = datafree_prompts(k_first, num, seq_len, bos=bos, vocab_size=vocab_size, excluded=excluded)
    buf = continue_tokens(logits_fn, buf, min(2, seq_len), 2 + greedy_tokens, k_rest)
    return {"input_ids": buf, "attention_mask": jnp.ones_like(buf)}
