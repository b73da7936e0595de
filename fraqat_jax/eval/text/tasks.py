"""Multiple-choice task files (``mc``, ``boolq``, ``commonsense_qa``) read into :class:`McItem` rows
with lm-evaluation-harness's prompts; see :mod:`fraqat_jax.eval.text`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["BOOLQ_CHOICES", "CSQA_LABELS", "TASK_KINDS", "McItem", "TaskError", "boolq_prompt",
           "commonsense_qa_prompt", "parse_specs", "read_boolq", "read_commonsense_qa", "read_lines", "read_mc",
           "read_task", "task_names"]

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


def parse_specs(text: str) -> list[str]:
    """``SPEC[,SPEC...]`` -> the specs, each checked for its form (the files are read later)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise TaskError(f"--tasks {text!r} names no task; use KIND:FILE[,KIND:FILE...] with KIND one of "
                        f"{', '.join(TASK_KINDS)}")
    task_names(specs)
    return specs
