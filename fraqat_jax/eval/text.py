"""Text evaluation: multiple-choice accuracy with lm-evaluation-harness's rule, perplexity, KL.

A *causal LM* here is any NNX module called as ``model(input_ids, attention_mask=mask) -> logits``
(``[B, T]`` int32 ids and 0/1 mask -> ``[B, T, vocab]``; the Gemma-2 port, its quantized student,
its frozen form). A *tokenizer* is a ``tokenizers.Tokenizer`` (the teacher folder's
``tokenizer.json``); ``tokenizer.encode(text).ids`` adds BOS when its post-processor says so, as
transformers' tokenizers and lm-eval do.

Multiple choice (lm-eval's ``multiple_choice`` output type, zero-shot):

- a choice's score is the sum of the log-probabilities of its continuation tokens given the context;
  the continuation is ``delimiter + choice`` (``" "`` for BoolQ and CommonsenseQA, ``""`` for ``mc``);
- its tokens are those of ``encode(context + continuation)`` after the first ``len(encode(context))``
  ones; whitespace at the end of the context is moved to the start of the continuation first;
- ``acc``: the argmax of the scores equals ``gold``; ``acc_norm``: the argmax of score / ``len(choice)``
  (characters of the choice, without the delimiter) equals ``gold``. Ties go to the first choice.

Task specs (:func:`read_task`): ``mc:FILE`` (JSONL ``{"context", "choices", "gold"}``), ``boolq:FILE``
(super_glue BoolQ rows ``question``, ``passage``, ``label``; prompt ``"{passage}\\nQuestion:
{question}?\\nAnswer:"``, choices ``no``/``yes``), ``commonsense_qa:FILE`` (``question``, ``choices``
with ``label``/``text``, ``answerKey``; prompt ``"Question: {question}\\nA. ...\\nE. ...\\nAnswer:"``,
choices ``A``..``E``). ``FILE`` is JSONL, or a JSON list of rows.

Perplexity: exp of the mean negative log-likelihood over every predicted token (every real token
after the first) of every sequence. KL: the mean over the same positions of
``KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` of the next-token distributions.

Batches are right-padded (``attention_mask`` 0 on padding) to a few fixed shapes (``batch_size`` rows,
lengths rounded up to a multiple of ``length_multiple``), sorted by length, so a model compiles once
per length bucket; only per-token values ever leave the device, never ``[B, T, vocab]`` logits.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MODELS", "TASK_KINDS", "McItem", "TaskError", "TextEvaluator", "TextRun", "TokenScorer", "encode_lines",
           "encode_pair", "evaluate_models", "evaluate_run", "heldout_windows", "is_text_model", "kl_divergence",
           "load_text_run", "mc_accuracy", "mc_scores", "parse_specs", "perplexity", "read_boolq",
           "read_commonsense_qa", "read_lines", "read_mc", "read_task", "task_names", "teacher_folder"]

TASK_KINDS = ("mc", "boolq", "commonsense_qa")
BOOLQ_CHOICES = ("no", "yes")
CSQA_LABELS = ("A", "B", "C", "D", "E")


class TaskError(ValueError):
    """A task spec or file that cannot be read (the message names it and what is allowed)."""


@dataclass(frozen=True)
class McItem:
    """One multiple-choice question: ``context``, the ``choices`` (scored as ``delimiter + choice``)
    and the index ``gold`` of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = ""

    @property
    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


# ----------------------------------------------------------------------------- task files


def _rows(path: str, spec: str) -> list[dict]:
    """The rows of a JSONL file (or of a JSON list)."""
    if not os.path.isfile(path):
        raise TaskError(f"task {spec!r}: {path!r} is not a file; give a JSONL file of rows")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"task {spec!r}: cannot read {path!r} ({e})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"task {spec!r}: {path!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"task {spec!r}: {path!r} line {number} is not JSON ({e.msg})") from None
    for number, row in numbered:
        if not isinstance(row, dict):
            raise TaskError(f"task {spec!r}: {path!r} row {number} is not a JSON object")
    if not numbered:
        raise TaskError(f"task {spec!r}: {path!r} holds no rows")
    return [dict(row, _row=number) for number, row in numbered]


def _field(row: dict, name: str, kind, spec: str, path: str):
    value = row.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TaskError(f"task {spec!r}: {path!r} row {row['_row']} has no {name!r} of type "
                        f"{getattr(kind, '__name__', kind)} (got {value!r})")
    return value


def read_mc(path: str, spec: str | None = None) -> list[McItem]:
    """``mc:FILE``: rows ``{"context": str, "choices": [str, ...], "gold": int}``; a choice is scored
    as written (no delimiter is added: put the space in the choice, ``" yes"``)."""
    spec = spec or f"mc:{path}"
    items = []
    for row in _rows(path, spec):
        context = _field(row, "context", str, spec, path)
        choices = _field(row, "choices", list, spec, path)
        gold = _field(row, "gold", int, spec, path)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: 'choices' must be >= 2 non-empty strings")
        if not 0 <= gold < len(choices):
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: gold={gold} is not in [0, {len(choices)})")
        if not context:
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: 'context' is empty; give a non-empty context")
        items.append(McItem(context, tuple(choices), gold))
    return items


def boolq_prompt(passage: str, question: str) -> str:
    """lm-eval's ``boolq`` prompt (super_glue, v2)."""
    return f"{passage}\nQuestion: {question}?\nAnswer:"


def read_boolq(path: str, spec: str | None = None) -> list[McItem]:
    """``boolq:FILE``: super_glue BoolQ rows (``question``, ``passage``, ``label`` 0 = no, 1 = yes)."""
    spec = spec or f"boolq:{path}"
    items = []
    for row in _rows(path, spec):
        label = row.get("label")
        if isinstance(label, bool):
            label = int(label)
        if label not in (0, 1):
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: 'label' must be 0 (no) or 1 (yes), "
                            f"got {label!r}")
        prompt = boolq_prompt(_field(row, "passage", str, spec, path), _field(row, "question", str, spec, path))
        items.append(McItem(prompt, BOOLQ_CHOICES, int(label), " "))
    return items


def commonsense_qa_prompt(question: str, texts: Sequence[str]) -> str:
    """lm-eval's ``commonsense_qa`` prompt: the question and the five lettered options."""
    options = "".join(f"\n{label}. {text}" for label, text in zip(CSQA_LABELS, texts))
    return f"Question: {question.strip()}{options}\nAnswer:"


def read_commonsense_qa(path: str, spec: str | None = None) -> list[McItem]:
    """``commonsense_qa:FILE``: CommonsenseQA rows (``question``, ``choices`` = ``{"label": [...],
    "text": [...]}`` with five options, ``answerKey`` in A..E)."""
    spec = spec or f"commonsense_qa:{path}"
    items = []
    for row in _rows(path, spec):
        choices = _field(row, "choices", dict, spec, path)
        texts = choices.get("text")
        if not isinstance(texts, list) or len(texts) != len(CSQA_LABELS) or not all(isinstance(t, str) for t in texts):
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: 'choices' must hold 'text', a list of "
                            f"{len(CSQA_LABELS)} strings")
        key = row.get("answerKey")
        if key not in CSQA_LABELS:
            raise TaskError(f"task {spec!r}: {path!r} row {row['_row']}: 'answerKey' must be one of "
                            f"{', '.join(CSQA_LABELS)}, got {key!r}")
        prompt = commonsense_qa_prompt(_field(row, "question", str, spec, path), texts)
        items.append(McItem(prompt, CSQA_LABELS, CSQA_LABELS.index(key), " "))
    return items


_READERS: dict[str, Callable[[str, str], list[McItem]]] = {
    "mc": read_mc, "boolq": read_boolq, "commonsense_qa": read_commonsense_qa}


def _split_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in _READERS or not path:
        raise TaskError(f"task spec {spec!r} is not KIND:FILE with KIND one of {', '.join(TASK_KINDS)} "
                        "(e.g. boolq:boolq_validation.jsonl)")
    return kind, path


def task_names(specs: Sequence[str]) -> list[str]:
    """The name each spec gets in ``eval.json``: its kind (``mc``, ``boolq``, ``commonsense_qa``);
    when a kind appears more than once, ``KIND:STEM`` with the file's name without its suffix."""
    kinds = [_split_spec(s)[0] for s in specs]
    names = []
    for spec, kind in zip(specs, kinds):
        stem = os.path.splitext(os.path.basename(_split_spec(spec)[1]))[0]
        names.append(kind if kinds.count(kind) == 1 else f"{kind}:{stem}")
    if len(set(names)) != len(names):
        raise TaskError(f"task specs {', '.join(specs)} give the same name twice; use files with different names")
    return names


def read_task(spec: str) -> list[McItem]:
    """The items of a task spec ``KIND:FILE`` (see the module docstring)."""
    kind, path = _split_spec(spec)
    return _READERS[kind](path, spec)


def read_lines(path: str) -> list[str]:
    """The non-blank lines of a text file (one sequence each, without the newline)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"--text {path!r} cannot be read ({e}); give a UTF-8 text file, one sequence per "
                        "line") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TaskError(f"--text {path!r} holds no text; give a UTF-8 text file, one sequence per line")
    return lines


# ----------------------------------------------------------------------------- tokens


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


def _as_sequences(sequences) -> list[list[int]]:
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
    lps = scorer.logprobs(_as_sequences(sequences))
    total = sum(float(-np.sum(lp, dtype=np.float64)) for lp in lps)
    count = sum(len(lp) for lp in lps)
    if count == 0:
        raise TaskError("no token to predict: every sequence holds a single token")
    return math.exp(total / count)


def kl_divergence(teacher: TokenScorer, student: TokenScorer, sequences) -> float:
    """Mean per-token KL(teacher || student) over every predicted position of every sequence (the
    two scorers must pad alike: same ``batch_size``, ``length_multiple``, ``max_length``)."""
    seqs = _as_sequences(sequences)
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
    seqs = _as_sequences(sequences)
    out = {"tasks": {task: {name: mc_accuracy(s, tokenizer, items) for name, s in scorers.items()}
                     for task, items in tasks.items()},
           "perplexity": {name: perplexity(s, seqs) for name, s in scorers.items()},
           "kl": kl_divergence(scorers["teacher"], scorers["student"], seqs) if "student" in scorers else None}
    return out


class TextEvaluator:
    """Students of one text run scored against its teacher on held-out token windows: the validation
    loss is the mean per-token KL(teacher || student) (the text family's training loss, ``loss=kl``),
    and ``ppl`` the student's perplexity on the same windows.

    ``sequences``: the windows (id lists or ``{"input_ids", "attention_mask"}``); by default the first
    ``num_val`` held-out windows of the run's data (``cfg.data`` through the family's data source),
    the same for every seed and method of a comparison.
    """

    def __init__(self, teacher, cfg=None, *, num_val: int = 64, batch_size: int = 8, sequences=None, **unused):
        if sequences is None:
            sequences = heldout_windows(teacher, cfg, num_val)
        self.sequences = _as_sequences(sequences)
        self.num_val, self.batch_size = len(self.sequences), int(batch_size)
        self.pad_id = int(teacher.config.get("pad_token_id") or 0)
        self.teacher = self._scorer(teacher)
        self.teacher_ppl = perplexity(self.teacher, self.sequences)

    def _scorer(self, model) -> TokenScorer:
        return TokenScorer(model, pad_id=self.pad_id, batch_size=self.batch_size)

    def val_loss(self, student) -> float:
        return kl_divergence(self.teacher, self._scorer(student), self.sequences)

    def evaluate(self, student) -> dict:
        """``{"val_loss": held-out KL, "ppl": the student's held-out perplexity}``."""
        scorer = self._scorer(student)
        return {"val_loss": kl_divergence(self.teacher, scorer, self.sequences),
                "ppl": perplexity(scorer, self.sequences)}

    def settings(self) -> dict:
        return {"num_val": self.num_val, "val_loss": "held-out KL(teacher || student) per token",
                "teacher_ppl": self.teacher_ppl,
                "val_tokens": int(sum(len(s) - 1 for s in self.sequences))}


def heldout_windows(teacher, cfg, num: int | None = None) -> dict:
    """The first ``num`` held-out windows (all when None or when fewer are held out) of the run's data
    source, from the teacher's family (``{"input_ids", "attention_mask"}`` arrays)."""
    from fraqat_jax.family import family_for_model

    source = family_for_model(teacher).make_source(cfg, dict(teacher.config))
    windows = source.heldout(None)  # all of them, each once (heldout(num) would repeat a short set)
    return {k: v[:num] for k, v in windows.items()} if num else windows


# ----------------------------------------------------------------------------- python -m fraqat_jax.eval (text runs)


def is_text_model(model) -> bool:
    """Whether ``model`` is a language-model port (a transformers-named causal LM)."""
    from fraqat_jax.models.transformers_folder import TRANSFORMERS_CLASSES

    return type(model).__name__ in TRANSFORMERS_CLASSES


def teacher_folder(teacher, cfg) -> str:
    """The transformers folder of a text run's teacher (its tokenizer lives there), from its family."""
    from fraqat_jax.family import family_for_model

    folder = family_for_model(teacher).teacher_folder(cfg)
    if not folder:
        raise TaskError(f"the run's teacher {cfg.teacher!r} has no transformers folder, so no tokenizer: "
                        "evaluate a run whose teacher is a folder (or builtin:lm)")
    return str(folder)


def parse_specs(text: str) -> list[str]:
    """``SPEC[,SPEC...]`` -> the specs, each checked for its form (the files are read later)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise TaskError(f"--tasks {text!r} names no task; use KIND:FILE[,KIND:FILE...] with KIND one of "
                        f"{', '.join(TASK_KINDS)}")
    task_names(specs)
    return specs


def _frozen(student, cfg):
    """The frozen integer form of a run's student (a scanned student is unrolled first: freezing
    works layer by layer)."""
    from fraqat_jax.nn import freeze
    from fraqat_jax.runs import unscanned

    return freeze(unscanned(student, cfg))


def evaluate_run(teacher, student, cfg, *, specs: Sequence[str] = (), text: str | None = None, batch_size: int = 8,
                 num_val: int | None = None) -> dict:
    """``eval.json`` of a text run: the student as trained, its frozen integer form and the teacher on
    the ``specs`` tasks, their perplexity on ``text`` (one sequence per line; default: the run's
    held-out windows) and the student's KL to the teacher there."""
    from fraqat_jax.data.text import load_tokenizer

    tasks = {name: read_task(spec) for name, spec in zip(task_names(list(specs)), specs)} if specs else {}
    tokenizer = load_tokenizer(teacher_folder(teacher, cfg), "the run's teacher")
    sequences = encode_lines(tokenizer, read_lines(text)) if text else heldout_windows(teacher, cfg, num_val)
    config = dict(teacher.config)
    models = {"teacher": teacher, "student": student, "student_frozen": _frozen(student, cfg)}
    return evaluate_models(models, tokenizer, tasks=tasks, sequences=sequences, batch_size=batch_size,
                           pad_id=int(config.get("pad_token_id") or 0),
                           max_length=config.get("max_position_embeddings"))


@dataclass
class TextRun:
    """A finished text run read back: its config, tokenizer and models by name (``teacher``,
    ``student``, ``student_frozen`` when asked for)."""

    cfg: object
    tokenizer: object
    models: dict

    @property
    def teacher(self):
        return self.models["teacher"]


def load_text_run(workdir: str, *, step: int | None = None, frozen: bool = True) -> TextRun:
    """The teacher, the student of checkpoint ``step`` (default the latest) and, with ``frozen``, its
    frozen integer form, with the teacher folder's tokenizer (``fraqat_jax.runs.load_run``)."""
    from fraqat_jax import runs
    from fraqat_jax.data.text import load_tokenizer

    teacher, student, cfg = runs.load_run(workdir, step=step)
    if not is_text_model(teacher):
        raise TaskError(f"{workdir!r} distils {type(teacher).__name__}, not a language model")
    models = {"teacher": teacher, "student": student}
    if frozen:
        models["student_frozen"] = _frozen(student, cfg)
    return TextRun(cfg, load_tokenizer(teacher_folder(teacher, cfg), "the run's teacher"), models)
