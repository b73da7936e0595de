"""Distillation losses over next-token distributions (``loss=kl|mse``).

Both take the teacher's and the student's logits ``[B, L, vocab]`` (any float dtype; computed in
float32) and a 0/1 ``mask`` ``[B, L]`` of the positions that count (real tokens), and return the
mean over those positions:

- ``kl``: forward ``KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` of the
  next-token distributions at every position, LLM-QAT's objective (mean-seeking: the student is
  pushed to cover every token the teacher gives mass to);
- ``mse``: the mean squared difference of the logits, averaged over the vocabulary too (the
  diffusion families' loss, on logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "logits_mse", "next_token_kl"]


def _masked_mean(per_position, mask):
    if mask is None:
        return jnp.mean(per_position)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_position * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_kl(teacher_logits, student_logits, mask=None):
    """Mean forward KL(teacher || student) per position (nats)."""
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    per_position = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return _masked_mean(per_position, mask)


def logits_mse(teacher_logits, student_logits, mask=None):
    """Mean squared logit difference per position and vocabulary entry."""
    diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
    return _masked_mean(jnp.mean(jnp.square(diff), axis=-1), mask)


LOSSES = {"kl": next_token_kl, "mse": logits_mse}
