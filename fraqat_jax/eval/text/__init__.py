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

from fraqat_jax.eval.text.run import (TextEvaluator, TextRun, evaluate_run, heldout_windows, is_text_model,
                                      load_text_run, teacher_folder)
from fraqat_jax.eval.text.scoring import (MODELS, TokenScorer, as_sequences, encode_lines, encode_pair,
                                          evaluate_models, kl_divergence, mc_accuracy, mc_scores, perplexity)
from fraqat_jax.eval.text.tasks import (TASK_KINDS, McItem, TaskError, boolq_prompt, commonsense_qa_prompt,
                                        parse_specs, read_boolq, read_commonsense_qa, read_lines, read_mc, read_task,
                                        task_names)

__all__ = ["MODELS", "TASK_KINDS", "McItem", "TaskError", "TextEvaluator", "TextRun", "TokenScorer", "as_sequences",
           "boolq_prompt", "commonsense_qa_prompt", "encode_lines", "encode_pair", "evaluate_models", "evaluate_run",
           "heldout_windows", "is_text_model", "kl_divergence", "load_text_run", "mc_accuracy", "mc_scores",
           "parse_specs", "perplexity", "read_boolq", "read_commonsense_qa", "read_lines", "read_mc", "read_task",
           "task_names", "teacher_folder"]
