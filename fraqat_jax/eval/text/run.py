"""A text run's models scored: the comparison's :class:`TextEvaluator`, ``python -m fraqat_jax.eval``'s
:func:`evaluate_run` and the adapter's :func:`load_text_run`; see :mod:`fraqat_jax.eval.text`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fraqat_jax.eval.text.scoring import (TokenScorer, as_sequences, encode_lines, evaluate_models, kl_divergence,
                                          perplexity)
from fraqat_jax.eval.text.tasks import TaskError, read_lines, read_task, task_names

__all__ = ["TextEvaluator", "TextRun", "evaluate_run", "heldout_windows", "is_text_model", "load_text_run",
           "teacher_folder"]


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
        self.sequences = as_sequences(sequences)
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
    source, from the teacher's family (``{"input_ids", "attention_mask"}`` arrays). For a data-free
    run (``data=datafree``) they are the teacher's own sequences drawn from the run's ``validation``
    stream, as training draws its held-out ones (``num`` of them, 16 when None)."""
    from flax import nnx

    from fraqat_jax.family import family_for_model

    family = family_for_model(teacher)
    sample_teacher = None
    if cfg.data == "datafree":
        graphdef, state = nnx.split(teacher)
        sampler = family.teacher_sampler(cfg, lambda st: nnx.merge(graphdef, st))

        def sample_teacher(prompts):
            return sampler(state, prompts)

    source = family.make_source(cfg, dict(teacher.config), sample_teacher)
    if cfg.data == "datafree":
        return source.heldout(num)
    windows = source.heldout(None)  # all of them, each once (heldout(num) would repeat a short set)
    return {k: v[:num] for k, v in windows.items()} if num else windows


# ----------------------------------------------------------------------------- python -m fraqat_jax.eval (text runs)


def is_text_model(model) -> bool:
    """Whether ``model``'s family is evaluated as a language model (``Family.evaluation == "text"``)."""
    from fraqat_jax.family import FamilyError, family_for_model

    try:
        return family_for_model(model).evaluation == "text"
    except FamilyError:
        return False


def teacher_folder(teacher, cfg) -> str:
    """The transformers folder of a text run's teacher (its tokenizer lives there), from its family."""
    from fraqat_jax.family import family_for_model

    folder = family_for_model(teacher).teacher_folder(cfg)
    if not folder:
        raise TaskError(f"the run's teacher {cfg.teacher!r} has no transformers folder, so no tokenizer: "
                        "evaluate a run whose teacher is a folder (or builtin:lm)")
    return str(folder)


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
