"""Token generation with a fixed-shape buffer: greedy continuations and LLM-QAT's data-free sequences.

Both take ``logits_fn(input_ids [B, T]) -> logits [B, T, vocab]`` (a causal LM called on the whole
buffer) and run under ``jit``: the buffer keeps its shape ``[B, T]`` from the first step to the
last, so one program serves every step (no key-value cache: the models this runs on CPU are tiny,
and on an accelerator a window of a few hundred tokens costs a few forward passes of the batch).
Causal attention makes the tokens after position ``t`` irrelevant to the prediction at ``t``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

__all__ = ["GREEDY_FIRST_TOKENS", "datafree_sequences", "greedy_continue"]

#: LLM-QAT's recipe: after a random first token, the next few are the teacher's top-1 choice.
GREEDY_FIRST_TOKENS = 3


def greedy_continue(logits_fn: Callable, prompts, num_new: int):
    """``[B, P + num_new]`` int32: ``prompts`` ``[B, P]`` (no padding) followed by ``num_new`` greedy
    (argmax) tokens."""
    prompts = jnp.asarray(prompts, jnp.int32)
    b, p = prompts.shape
    buf = jnp.concatenate([prompts, jnp.zeros((b, num_new), jnp.int32)], axis=1)

    def body(t, buf):
        logits = logits_fn(buf)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), t, axis=1)

    return jax.lax.fori_loop(p, p + num_new, body, buf)


def datafree_sequences(logits_fn: Callable, key, num: int, seq_len: int, *, bos: int, vocab_size: int,
                       excluded: Iterable[int] = (), greedy_tokens: int = GREEDY_FIRST_TOKENS):
    """LLM-QAT's data-free text (Liu et al. 2023, section 2.1): ``{"input_ids", "attention_mask"}``
    ``[num, seq_len]`` int32 sampled from the teacher. Position 0 is ``bos``; position 1 a token drawn
    uniformly from the vocabulary without the ``excluded`` ids (special tokens); the next
    ``greedy_tokens`` positions the teacher's argmax; every later one drawn from the teacher's
    next-token distribution (temperature 1). ``key`` fixes everything."""
    k_first, k_rest = jax.random.split(key)
    forbidden = jnp.zeros((vocab_size,), bool).at[jnp.asarray(sorted(set(excluded)), jnp.int32)].set(True) \
        if excluded else jnp.zeros((vocab_size,), bool)
    first = jax.random.categorical(k_first, jnp.where(forbidden, -jnp.inf, 0.0), shape=(num,)).astype(jnp.int32)
    buf = jnp.zeros((num, seq_len), jnp.int32).at[:, 0].set(bos)
    if seq_len > 1:
        buf = buf.at[:, 1].set(first)

    def body(t, buf):
        logits = jax.lax.dynamic_index_in_dim(logits_fn(buf), t - 1, axis=1, keepdims=False).astype(jnp.float32)
        sampled = jax.random.categorical(jax.random.fold_in(k_rest, t), logits, axis=-1)
        nxt = jnp.where(t < 2 + greedy_tokens, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt, t, axis=1)

    buf = jax.lax.fori_loop(2, seq_len, body, buf)
    return {"input_ids": buf, "attention_mask": jnp.ones_like(buf)}
