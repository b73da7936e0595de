"""text/: the text family (causal language models: Gemma-2) behind the family interface, the object
``GEMMA2`` (``gemma2``, a ``fraqat_jax.families`` entry point): token windows as training inputs, forward KL(teacher || student) over the
next-token distributions as the distillation loss, held-out windows, LLM-QAT's data-free
sequences, greedy text samples at each change of bit-width.

``family``: :class:`TextFamily` (teachers, data, inputs, loss, samples). ``loss``: ``kl`` and
``mse`` over logits. ``sampler``: the one decoder (the port's key-value cache; batched, greedy or
sampled, end tokens, stop strings, chat templates). ``generate``: greedy continuations and
data-free sequences in a fixed-shape buffer, through it. ``samples``: the text sample files. Imports ``data/``, ``models/`` and ``family/``.
"""

from fraqat_jax.text.family import (BUILTIN_TEACHER, GEMMA2, LOSS_NAMES, PROMPT_TOKENS, TextConfig, TextFamily,
                                   builtin_teacher_dir)
from fraqat_jax.text.generate import continue_tokens, datafree_sequences, greedy_continue
from fraqat_jax.text.loss import LOSSES, logits_mse, next_token_kl
from fraqat_jax.models.sampler import Completion, Sampler, SamplerError, end_token_ids

__all__ = ["BUILTIN_TEACHER", "Completion", "GEMMA2", "LOSSES", "LOSS_NAMES", "PROMPT_TOKENS", "Sampler",
           "SamplerError", "TextConfig", "TextFamily", "builtin_teacher_dir", "continue_tokens", "datafree_sequences",
           "end_token_ids", "greedy_continue", "logits_mse",
           "next_token_kl"]
