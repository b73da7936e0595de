"""export/: ship a trained student: a frozen W4A8 orbax checkpoint, dequantized weights for diffusers
or transformers, an ONNX QDQ graph, or a QNN HTP folder for Qualcomm's Hexagon NPU.

The part holds ``orbax.py`` (the exact serving form, :func:`load`), ``onnx.py`` (ONNX QDQ, checked by
onnxruntime), ``jaxpr_onnx.py`` (the jaxpr-to-ONNX converter), ``qnn.py`` and ``qnn_graph.py`` (the
QDQ form QNN HTP executes whole, its compiled EPContext model and ``qnn.json``, checked on the
``onnxruntime-qnn`` HTP simulator), ``qnn_pipeline.py`` (``pipeline.json`` and the text-to-image folder:
text encoder, transformer and decoder on HTP, for ``python -m fraqat_jax.deploy``), ``transformers.py`` (a text student as a transformers folder) and
``__main__.py`` (the command line).
It imports the parts below it (diffusion, models, nn, quant, data), ``deploy/`` (the runner's
manifest and tokenization) and ``runs/`` for a finished run;
nothing imports it but command lines and ``compare/``.

``python -m fraqat_jax.export --workdir DIR --out PATH [--format orbax|diffusers|transformers|onnx|qnn]``

``--format orbax`` (default) writes the serving form, the model that was trained:

1. the run's final student (``fraqat_jax.runs.load_run``), at its final bit-width, with the
   activation quantization it was trained with: dynamic per-token int8 ranges for
   ``act_ranges=dynamic``, the calibrated ranges from its checkpoint for ``act_ranges=static``;
2. for a dynamically trained student, static ranges are also calibrated and stored (100
   training-style inputs, mean +/- 3 std, integer zero points; ``fraqat_jax.calibrate``) for
   runtimes that support only static quantization (the ONNX export); the JAX model does not use them;
3. ``fraqat_jax.freeze``: integer weight codes (two 4-bit codes per byte at <= 4 bits), float32
   scales, the activation ranges;
4. an orbax checkpoint at ``PATH`` with two items: ``state`` (the frozen model's arrays, each in the
   dtype it was trained in; the per-output sums of the codes, derived data, are recomputed at load)
   and ``meta`` (model class, diffusers config, quantization rules, each layer's bits and activation
   granularity, sizes and the measured agreement).

:func:`load` rebuilds the frozen model from ``PATH``; it runs and samples like the port. Trained
equals exported: before writing, its output is checked against the fake-quant student on held-out
training-style inputs (the run's data, noise and timesteps), within ``TOLERANCE`` of the student's
max abs output (the two differ only by float32 rounding order). The export prints the measured
figure and the size ratio: the bytes of every stored array over the bytes of the same model's
parameters in bfloat16.

``--format onnx`` writes an ONNX QDQ graph (:mod:`fraqat_jax.export.onnx`, converted by :mod:`fraqat_jax.export.jaxpr_onnx`).

``--format qnn`` writes a folder for Qualcomm's HTP (:mod:`fraqat_jax.export.qnn`): one network and
``pipeline.json``; for a run whose family gives a text-to-image pipeline
(``Family.pipeline_components``), the three-network folder of :mod:`fraqat_jax.export.qnn_pipeline`
with the text encoder and decoder at ``--component-bits``; for a language model, the prefill and
decode graphs of :mod:`fraqat_jax.export.qnn_text`.

``--format diffusers`` writes ``PATH/config.json`` and ``PATH/diffusion_pytorch_model.safetensors``:
the student's fake-quantized weights (dequantized, bfloat16) in diffusers' layout, so diffusers
pipelines and :func:`fraqat_jax.models.from_diffusers` load the QAT'd model (full-precision
activations).

Errors (no trained student in the workdir, an output path that cannot be written, an existing
output that is not an export): one line on stderr, exit status 2.
"""

from fraqat_jax.export.orbax import (CALIBRATION_SAMPLES, FORMAT_VERSION, TOLERANCE, ExportError,
                                     calibration_batches, export_diffusers, export_orbax, fake_quantized_copy,
                                     load, load_metadata, model_forward)

__all__ = ["CALIBRATION_SAMPLES", "FORMAT_VERSION", "TOLERANCE", "ExportError", "calibration_batches",
           "export_diffusers", "export_orbax", "fake_quantized_copy", "load", "load_metadata", "main",
           "model_forward"]


def __getattr__(name):
    if name in ("main", "build_parser"):  # the command line, imported only when asked for
        from fraqat_jax.export import __main__ as cli

        return getattr(cli, name)
    raise AttributeError(f"module 'fraqat_jax.export' has no attribute {name!r}")
