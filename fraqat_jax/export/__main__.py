"""``python -m fraqat_jax.export``: the command line of :mod:`fraqat_jax.export` (see there)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp

import fraqat_jax
from fraqat_jax import runs
from fraqat_jax.cli import Parser, fail
from fraqat_jax.export.orbax import (CALIBRATION_SAMPLES, TOLERANCE, ExportError, calibration_batches,
                                     export_diffusers, export_orbax)
from fraqat_jax.family import family_for_model
from fraqat_jax.nn import quantized_layers


def _export_onnx(teacher, student, cfg, args) -> dict:
    """``--format onnx``: static input ranges (the trained ones, or calibrated for a dynamically
    trained student), then the QDQ graph checked by onnxruntime against the frozen JAX model."""
    try:
        from fraqat_jax.export.onnx import TOLERANCE as TOLERANCE_ONNX
        from fraqat_jax.export.onnx import OnnxExportError, export_onnx_run, summary
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx extra: pip install 'fraqat_jax[onnx]' ({e})") from None
    family = family_for_model(teacher)
    student = _static_student(teacher, student, cfg, args)
    held_out = calibration_batches(teacher, cfg, num_samples=6, batch_size=6, seed=1)[0]
    try:
        report = export_onnx_run(student, family, held_out, args.out)
    except OnnxExportError as e:
        raise ExportError(str(e)) from None
    print(summary(report))
    if report["max_rel_diff"] > TOLERANCE_ONNX:
        print(f"error: onnxruntime disagrees with the frozen JAX model by {report['max_rel_diff']:.2e} x max|out|, "
              f"above the export's tolerance {TOLERANCE_ONNX:g}", file=sys.stderr)
        raise SystemExit(1)
    return report


def _static_student(teacher, student, cfg, args):
    """The student with static input ranges: the trained ones, or calibrated now (a dynamically
    trained student; a note says so)."""
    family = family_for_model(teacher)
    if any(layer.act_bits is not None and not bool(jnp.isfinite(layer.act_range[...]).all())
           for _, layer in quantized_layers(student)):
        print("note: the student was trained with dynamic activation ranges; the graph uses static ranges "
              "calibrated now (train with --set act_ranges=static for a phone model that is the trained one)")
        fraqat_jax.calibrate(student, calibration_batches(teacher, cfg, num_samples=args.calibration_samples),
                             forward=family.apply, switch_to_static=False)
    return student


def _export_qnn(teacher, student, cfg, args) -> dict:
    """``--format qnn``: the QNN HTP form in the folder ``--out`` (see fraqat_jax.export.qnn); exit 1
    when HTP does not take the whole graph or an agreement fails."""
    from fraqat_jax.export import qnn

    student = _static_student(teacher, student, cfg, args)
    try:
        report = qnn.export_qnn(teacher, student, cfg, args.out, soc=args.soc, batch_size=args.batch_size,
                                product_bits=args.product_bits, calibration_samples=args.calibration_samples)
    except qnn.OnnxExportError as e:
        raise ExportError(str(e)) from None
    print(qnn.summary(report))
    if not report["ok"]:
        if not report.get("refused"):
            print(f"error: agreement outside the tolerances (QNN vs onnxruntime {qnn.TOL_ORT:g}, vs the JAX student "
                  f"{qnn.TOL_STUDENT:g}, EPContext {qnn.TOL_CONTEXT:g})", file=sys.stderr)
        else:
            print(f"error: QNN HTP refused {len(report['refused'])} node(s): {', '.join(report['refused'][:20])}",
                  file=sys.stderr)
        raise SystemExit(1)
    return report


def _export_transformers(teacher, student, cfg, args) -> dict:
    """``--format transformers``: the folder, checked against the student with float activations
    (exit 1 above the tolerance); the gap to the W4A8 student is printed (see export.transformers)."""
    from fraqat_jax.export import transformers as hf_export

    family = family_for_model(teacher)
    if family.export_format != "transformers":
        raise ExportError(f"--format transformers takes a language-model run; {args.workdir!r} distils "
                          f"{type(student).__name__} (use --format {family.export_format} for it)")
    batches = calibration_batches(teacher, cfg, num_samples=4, batch_size=4, seed=1)
    report = hf_export.export_transformers(student, args.out, tokenizer_from=family.teacher_folder(cfg),
                                           check_batches=batches)
    print(f"wrote {report['tensors']} tensors ({report['bytes']} bytes, bfloat16, dequantized weights), config.json"
          f"{' and the tokenizer' if report['tokenizer'] else ''} to {args.out}; max |transformers - student with float "
          f"activations| / max = {report['max_rel_diff_vs_float_activations']:.2e} (tolerance {hf_export.TOLERANCE:g}); "
          f"vs the W4A8 student: {report['max_rel_diff_vs_w4a8']:.2e}")
    if report["max_rel_diff_vs_float_activations"] > hf_export.TOLERANCE:
        print("error: the exported folder disagrees with the student beyond the tolerance", file=sys.stderr)
        raise SystemExit(1)
    return report


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fraqat_jax.export",
                                description="Ship a trained student: a frozen W4A8 orbax checkpoint, dequantized "
                                            "weights for diffusers, or an ONNX QDQ graph.")
    p.add_argument("--workdir", required=True, help="a run directory written by python -m fraqat_jax.train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("orbax", "diffusers", "transformers", "onnx", "qnn"), default="orbax",
                   help="orbax: frozen W4A8 checkpoint (load with fraqat_jax.export.load); diffusers: dequantized "
                        "bf16 folder; transformers: a language-model run as a transformers folder (dequantized "
                        "bf16 safetensors, config, tokenizer; AutoModelForCausalLM loads it); onnx: one QDQ .onnx file (INT4 weights, static uint8 inputs) for phone "
                        "runtimes (needs the onnx extra); qnn: a folder with model.onnx in the form Qualcomm's QNN "
                        "HTP runs whole, its compiled HTP context (model_ctx.onnx) and qnn.json, checked on the "
                        "QNN HTP simulator (needs the qnn extra)")
    p.add_argument("--soc", default="sm8750", type=str.lower,
                   help="--format qnn: the Snapdragon SoC the HTP context is compiled for: sm8750 (HTP v79, "
                        "Snapdragon 8 Elite, default), sm8650 (v75), sm8550 (v73), sm8850 (v81)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="--format qnn: the graph's fixed batch size (QNN HTP needs static shapes; default 1)")
    p.add_argument("--product-bits", type=int, default=16,
                   help="--format qnn: width of a W4A8 layer's product on HTP: 16 (default: the trained uint8 "
                        "input carried exactly in uint16, a uint16 output; meets the agreement tolerances) or 8 "
                        "(HTP's 8-bit kernels, every product rounded to 256 levels; see docs/deploy.md)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES,
                   help=f"inputs for the static activation ranges (default {CALIBRATION_SAMPLES}, the paper's)")
    return p


def _check_out(out: str, fmt: str) -> None:
    out = os.path.abspath(out)
    if fmt == "onnx":
        if os.path.isdir(out):
            raise ExportError(f"--out {out!r} is a directory; --format onnx writes one .onnx file")
        parent = os.path.dirname(out) or "."
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ExportError(f"cannot write --out {out!r}: {parent!r} is not a writable directory")
        return
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ExportError(f"--out {out!r} exists and is not a directory")
        marker = {"orbax": "meta", "diffusers": "config.json", "transformers": "config.json", "qnn": "qnn.json"}[fmt]
        ours = os.path.isdir(os.path.join(out, marker)) if fmt == "orbax" else os.path.isfile(os.path.join(out, marker))
        if os.listdir(out) and not ours:
            raise ExportError(f"--out {out!r} exists, is not empty and is not an earlier {fmt} export; "
                              "choose a new path")
        if not os.access(out, os.W_OK):
            raise ExportError(f"--out {out!r} is not writable")
        return
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ExportError(f"cannot create --out {out!r}: {parent!r} is not a writable directory")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        if args.calibration_samples < 1:
            raise ExportError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
        if args.format == "qnn":
            from fraqat_jax.export import qnn

            if args.soc not in qnn.SOCS:
                raise ExportError(f"unknown --soc {args.soc!r}; allowed: {', '.join(qnn.SOCS)}")
            if args.batch_size < 1:
                raise ExportError(f"--batch-size must be >= 1, got {args.batch_size}")
            if args.product_bits not in qnn.PRODUCT_BITS:
                raise ExportError(f"--product-bits must be 16 or 8, got {args.product_bits}")
            try:
                qnn.qnn_module()
            except qnn.QnnUnavailable as e:
                raise ExportError(str(e)) from None
        elif args.soc != "sm8750" or args.batch_size != 1 or args.product_bits != 16:
            raise ExportError(f"--soc, --batch-size and --product-bits apply to --format qnn, not --format {args.format}")
        _check_out(args.out, args.format)
        if not os.path.isdir(args.workdir):
            raise ExportError(f"--workdir {args.workdir!r} does not exist")
        try:
            teacher, student, cfg = runs.load_run(args.workdir, step=args.step, ema=args.ema, unscan=True,
                                                  attention="xla")
        except (ValueError, FileNotFoundError) as e:
            raise ExportError(f"no trained student in {args.workdir!r}: {e}") from None
        if args.format == "onnx":
            return _export_onnx(teacher, student, cfg, args)
        if args.format == "qnn":
            return _export_qnn(teacher, student, cfg, args)
        if args.format == "transformers":
            return _export_transformers(teacher, student, cfg, args)
        if args.format == "diffusers":
            info = export_diffusers(student, args.out)
            print(f"wrote {info['tensors']} tensors ({info['bytes']} bytes, bfloat16, fake-quantized weights) "
                  f"and config.json to {args.out}")
            return info
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)  # an earlier export (checked above): orbax writes a fresh directory
        meta = export_orbax(teacher, student, cfg, args.out, num_samples=args.calibration_samples)
    except (ExportError, OSError) as e:
        fail(e)
    bits = sorted({s["bits"] for s in meta["layers"].values() if s["bits"] is not None})
    print(f"exported W{'/'.join(f'{b:g}' for b in bits)}A8 model to {args.out}: {meta['stored_bytes']} bytes = "
          f"{meta['bytes_ratio_vs_bf16']:.3f} x the bf16 weights ({meta['bf16_bytes']} bytes); "
          f"max |exported - fake-quant| / max |fake-quant| = {meta['max_rel_diff_vs_fake_quant']:.2e} "
          f"(tolerance {TOLERANCE:g})")
    return meta


if __name__ == "__main__":
    main()
