"""Scoring a causal LM over padded batches: lm-eval's multiple-choice rule, perplexity, per-token KL;
see :mod:`fraqat_jax.eval.text`."""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.eval.text.tasks import McItem, TaskError

__all__ = ["MODELS", "TokenScorer", "as_sequences", "encode_lines", "encode_pair", "evaluate_models",
           "kl_divergence", "mc_accuracy", "mc_scores", "perplexity"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    context_ids = tokenizer.encode(context).ids
    return list(whole[: len(context_ids)]), list(whole[len(context_ids):])


# ----------------------------------------------------------------------------- scoring


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _token_logprobs(logits, targets):
    """log p(targets | inputs) from ``[B, L, V]`` logits of ``L`` inputs, float32 ``[B, L]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]


def _token_kl(teacher_logits, student_logits):
    """KL(teacher || student) of each position's next-token distribution, float32 ``[B, L]``."""
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


@functools.lru_cache(maxsize=64)
def _logits_fn(graphdef):
    """``logits(state, ids, mask)`` of a model structure (one per structure: students of a comparison
    share their traced functions)."""
    return lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask)


@functools.lru_cache(maxsize=64)
def _scores_fn(graphdef):
    logits = _logits_fn(graphdef)

    def scores(state, ids, mask, targets):
        out = logits(state, ids, mask)
        return _token_logprobs(out, targets), jnp.argmax(out, axis=-1) == targets

    return jax.jit(scores)


@functools.lru_cache(maxsize=64)
def _kl_fn(teacher_graphdef, student_graphdef):
    teacher, student = _logits_fn(teacher_graphdef), _logits_fn(student_graphdef)
    return jax.jit(lambda ts, ss, ids, mask: _token_kl(teacher(ts, ids, mask), student(ss, ids, mask)))


class TokenScorer:
    """Per-token log-probabilities of a causal LM over right-padded batches of id sequences.

    A sequence of ``n`` ids is fed as its first ``n - 1`` (the inputs) and scored on its last
    ``n - 1`` (the targets), as the harness feeds ``(context + continuation)[:-1]``.

    Args:
      model: the causal LM (``model(input_ids, attention_mask=mask) -> logits``).
      pad_id: the id written on padding (masked out; any valid id).
      batch_size: rows per forward pass (the last batch is filled with dummy rows).
      length_multiple: padded input lengths are rounded up to a multiple of this (one compile per
        length).
      max_length: the most inputs fed at once: a longer sequence keeps its last ``max_length + 1``
        ids (the harness's left truncation); None keeps it whole.
    """

    def __init__(self, model, *, pad_id: int = 0, batch_size: int = 8, length_multiple: int = 32,
                 max_length: int | None = None):
        if batch_size < 1 or length_multiple < 1:
            raise ValueError(f"batch_size and length_multiple must be >= 1, got {batch_size} and {length_multiple}")
        self.graphdef, self.state = nnx.split(model)
        self.pad_id, self.batch_size, self.length_multiple = int(pad_id), int(batch_size), int(length_multiple)
        self.max_length = max_length
        self.logits = _logits_fn(self.graphdef)
        self._scores = _scores_fn(self.graphdef)

    def batches(self, sequences: Sequence[Sequence[int]]):
        """``(indices, inputs, mask, targets, counts)`` per padded batch: ``counts[j]`` real inputs in
        row ``j``; sequences grouped by length (longest first); sequences of one id are skipped."""
        keep = None if self.max_length is None else self.max_length + 1
        seqs = [list(s)[-keep:] if keep else list(s) for s in sequences]
        order = sorted((i for i in range(len(seqs)) if len(seqs[i]) > 1), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            length = _round_up(max(len(seqs[i]) - 1 for i in idx), self.length_multiple)
            ids = np.full((self.batch_size, length), self.pad_id, np.int32)
            targets = np.full((self.batch_size, length), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            mask[:, 0] = 1  # dummy rows see one token, so no row is all padding
            for row, i in enumerate(idx):
                n = len(seqs[i]) - 1
                ids[row, :n], targets[row, :n], mask[row, :n] = seqs[i][:-1], seqs[i][1:], 1
            yield idx, ids, mask, targets, [len(seqs[i]) - 1 for i in idx]

    def logprobs(self, sequences: Sequence[Sequence[int]], *, greedy: bool = False):
        """For each sequence of ``n`` ids, the ``n - 1`` log-probabilities of ids 1.. given the ones
        before (float32; after ``max_length`` truncation). With ``greedy``, also whether each of those
        ids is the model's argmax there (bool, same shape)."""
        lps: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        hits: list[np.ndarray] = [np.zeros(0, bool)] * len(sequences)
        for idx, ids, mask, targets, counts in self.batches(sequences):
            lp, hit = jax.device_get(self._scores(self.state, jnp.asarray(ids), jnp.asarray(mask),
                                                  jnp.asarray(targets)))
            for row, (i, n) in enumerate(zip(idx, counts)):
                lps[i], hits[i] = lp[row, :n], hit[row, :n]
        return (lps, hits) if greedy else lps

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood`` on token ids: for each ``(context_ids, continuation_ids)``, the
        summed log-probability of the continuation (float64 sum) and whether every continuation token
        is the greedy one."""
        lps, hits = self.logprobs([list(c) + list(k) for c, k in pairs], greedy=True)
        out = []
        for (_, k), lp, hit in zip(pairs, lps, hits):
            k = min(len(k), len(lp))
            out.append((float(np.sum(lp[len(lp) - k:], dtype=np.float64)), bool(hit[len(hit) - k:].all())))
        return out


def mc_scores(scorer: TokenScorer, tokenizer, items: Sequence[McItem]) -> list[np.ndarray]:
    """Each item's choice scores (summed continuation log-probabilities, float64)."""
    pairs, owners = [], []
    for n, item in enumerate(items):
        for cont in item.continuations:
            ctx, cont_ids = encode_pair(tokenizer, item.context, cont)
            if not cont_ids:
                raise TaskError(f"item {n}: choice {cont!r} after context {item.context[-30:]!r} encodes to no token "
                                "of its own (the tokenizer merges it into the context; lm-eval cannot score it either)")
            pairs.append((ctx, cont_ids))
            owners.append(n)
    scores: list[list[float]] = [[] for _ in items]
    for (score, _), n in zip(scorer.loglikelihoods(pairs), owners):
        scores[n].append(score)
    return [np.asarray(s, np.float64) for s in scores]


def mc_accuracy(scorer: TokenScorer, tokenizer, items: Sequence[McItem]) -> dict:
    """``{"acc", "acc_norm", "n"}`` of a task's items (see the module docstring)."""
    scores = mc_scores(scorer, tokenizer, items)
    acc = [int(np.argmax(s)) == it.gold for s, it in zip(scores, items)]
    norm = [int(np.argmax(s / np.array([len(c) for c in it.choices], np.float64))) == it.gold
            for s, it in zip(scores, items)]
    n = len(items)
    return {"acc": float(np.mean(acc)) if n else math.nan, "acc_norm": float(np.mean(norm)) if n else math.nan, "n": n}


def as_sequences(sequences) -> list[list[int]]:
    """Id lists from a list of id lists or from ``{"input_ids", "attention_mask"}`` arrays (real tokens
    are those with mask 1, a prefix of each row)."""
    if isinstance(sequences, dict):
        ids, mask = np.asarray(sequences["input_ids"]), np.asarray(sequences["attention_mask"])
        return [list(row[: int(m.sum())]) for row, m in zip(ids, mask)]
    return [list(s) for s in sequences]


def encode_lines(tokenizer, lines: Iterable[str]) -> list[list[int]]:
    """Each line's ids as the tokenizer encodes it (BOS when it adds one)."""
    return [list(tokenizer.encode(line).ids) for line in lines]


def perplexity(scorer: TokenScorer, sequences) -> float:
    """exp of the mean negative log-likelihood over every predicted token of every sequence
    (``sequences``: id lists, or ``{"input_ids", "attention_mask"}`` arrays)."""
    lps = scorer.logprobs(as_sequences(sequences))
    total = sum(float(-np.sum(lp, dtype=np.float64)) for lp in lps)
    count = sum(len(lp) for lp in lps)
    if count == 0:
        raise TaskError("no token to predict: every sequence holds a single token")
    return math.exp(total / count)


def kl_divergence(teacher: TokenScorer, student: TokenScorer, sequences) -> float:
    """Mean per-token KL(teacher || student) over every predicted position of every sequence (the
    two scorers must pad alike: same ``batch_size``, ``length_multiple``, ``max_length``)."""
    seqs = as_sequences(sequences)
    fn = _kl_fn(teacher.graphdef, student.graphdef)
    total, count = 0.0, 0
    for _, ids, mask, _, counts in teacher.batches(seqs):
        kl = np.asarray(fn(teacher.state, student.state, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
        for row, n in enumerate(counts):
            total += float(kl[row, :n].sum())
            count += n
    if count == 0:
        raise TaskError("no token to predict: every sequence holds a single token")
    return total / count


# ----------------------------------------------------------------------------- a run's three models

MODELS = ("teacher", "student", "student_frozen")


def evaluate_models(models: dict, tokenizer, *, tasks: dict[str, Sequence[McItem]], sequences, batch_size: int = 8,
                    pad_id: int = 0, max_length: int | None = None, length_multiple: int = 32) -> dict:
    """``eval.json``'s text content for ``models`` (``{"teacher", "student", "student_frozen"}`` ->
    causal LM; any subset holding ``teacher``): ``tasks`` (task name -> model -> ``{"acc",
    "acc_norm", "n"}``), ``perplexity`` (model -> float, on ``sequences``) and ``kl`` (mean per-token
    KL(teacher || student) on ``sequences``, None without a student)."""
    scorers = {name: TokenScorer(m, pad_id=pad_id, batch_size=batch_size, length_multiple=length_multiple,
                                 max_length=max_length) for name, m in models.items()}
    seqs = as_sequences(sequences)
    out = {"tasks": {task: {name: mc_accuracy(s, tokenizer, items) for name, s in scorers.items()}
                     for task, items in tasks.items()},
           "perplexity": {name: perplexity(s, seqs) for name, s in scorers.items()},
           "kl": kl_divergence(scorers["teacher"], scorers["student"], seqs) if "student" in scorers else None}
    return out
