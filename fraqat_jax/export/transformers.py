"""``--format transformers``: a text student as a transformers model folder.

The folder holds ``config.json`` (the teacher's transformers config), ``model.safetensors`` (every
weight in bfloat16, the quantized kernels *dequantized*: the fake-quantized values the student was
trained with, ``codes x scale``) and the teacher's tokenizer and generation files, so
``transformers.AutoModelForCausalLM.from_pretrained(PATH)`` loads it and hands it on (vLLM,
llama.cpp's converters, lm-eval's ``hf`` model). Activations are not quantized in this form.

Agreement, measured before the command returns (:func:`export_transformers`): the folder is read
back with :func:`fraqat_jax.models.from_transformers` and its logits on held-out inputs are compared
with

- the student with activation quantization off (the same dequantized weights, float activations):
  ``max |exported - student_A16| / max |student_A16|``, which must stay within :data:`TOLERANCE`
  (the two differ by the bfloat16 rounding of the weights); above it the export fails;
- the W4A8 student as trained (reported, not checked: the gap is what 8-bit activations add).
"""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from fraqat_jax.export.orbax import fake_quantized_copy
from fraqat_jax.models import from_transformers, save_transformers
from fraqat_jax.nn import quantized_layers
from fraqat_jax.quant import rel_diff

__all__ = ["TOLERANCE", "export_transformers", "float_activation_copy"]

TOLERANCE = 1e-2  # exported (bf16 weights) vs the student with float activations, relative to max |logits|


def float_activation_copy(student) -> nnx.Module:
    """A copy of ``student`` whose quantized layers leave their inputs in float (``act_bits=None``);
    the weights stay fake-quantized."""
    copy = nnx.clone(student)
    for _, layer in quantized_layers(copy):
        layer.act_bits = None
    return copy


def _logits(model, batches) -> list[np.ndarray]:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, attention_mask=mask))
    out = []
    for batch in batches:
        mask = np.asarray(batch["attention_mask"])
        logits = np.asarray(fn(state, batch["input_ids"], batch["attention_mask"]), np.float64)
        out.append(logits[mask.astype(bool)])  # real positions only
    return out


def export_transformers(student, out: str, *, tokenizer_from: str | None, check_batches=None) -> dict:
    """Writes the transformers folder ``out`` (see the module docstring) and returns a report:
    ``tensors``, ``bytes`` (of ``model.safetensors``), ``dtype`` and, when ``check_batches`` (a list
    of ``{"input_ids", "attention_mask"}`` arrays) is given, ``max_rel_diff_vs_float_activations``,
    ``max_rel_diff_vs_w4a8`` and ``tolerance``."""
    dequantized = fake_quantized_copy(student)
    folder = save_transformers(dequantized, out, tokenizer_from=tokenizer_from, dtype=ml_dtypes.bfloat16)
    path = os.path.join(folder, "model.safetensors")
    from safetensors import safe_open

    with safe_open(path, "numpy") as f:
        count = len(list(f.keys()))
    report = {"path": os.path.abspath(out), "tensors": count, "bytes": os.path.getsize(path), "dtype": "bfloat16",
              "tokenizer": bool(tokenizer_from)}
    if check_batches:
        exported = _logits(from_transformers(folder), check_batches)
        report["max_rel_diff_vs_float_activations"] = rel_diff(exported, _logits(float_activation_copy(student),
                                                                              check_batches))
        report["max_rel_diff_vs_w4a8"] = rel_diff(exported, _logits(student, check_batches))
        report["tolerance"] = TOLERANCE
    return report
