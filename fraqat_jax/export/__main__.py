"""``python -m fraqat_jax.export``: the command line of :mod:`fraqat_jax.export` (see there)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np

import fraqat_jax
from fraqat_jax import runs
from fraqat_jax.cli import Parser, fail
from fraqat_jax.export.orbax import (CALIBRATION_SAMPLES, TOLERANCE, ExportError, calibration_batches,
                                     export_diffusers, export_orbax)
from fraqat_jax.family import CapabilityError, family_for_model
from fraqat_jax.nn import quantized_layers

#: ``--component-bits`` default: the text encoder and decoder of a text-to-image folder at W8A16, as
#: Qualcomm AI Hub ships its diffusion pipelines.
DEFAULT_COMPONENT_BITS = 8
#: Prompts of a text-to-image folder's calibration (spread over the family's training prompts; each
#: run through the sampler, every transformer call a calibration input) and of its agreement figures.
PIPELINE_PROMPTS, PIPELINE_HELDOUT_PROMPTS = 20, 2


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

    family = family_for_model(teacher)
    student = _static_student(teacher, student, cfg, args)
    parts = None
    if not family.decodes_with_cache:
        try:
            parts = family.pipeline_components(cfg, student)
        except CapabilityError:
            parts = None  # one network: today's layout
    if parts is not None:
        return _export_qnn_pipeline(parts, args)
    if args.component_bits is not None:
        raise ExportError(f"--component-bits applies to a text-to-image pipeline run (its text encoder and decoder); "
                          f"{args.workdir!r} exports one {type(student).__name__}")
    if family.decodes_with_cache:
        return _export_qnn_text(teacher, student, cfg, args)
    try:
        report = qnn.export_qnn(teacher, student, cfg, args.out, soc=args.soc, batch_size=args.batch_size,
                                product_bits=args.product_bits, calibration_samples=args.calibration_samples)
    except qnn.OnnxExportError as e:
        raise ExportError(str(e)) from None
    print(qnn.summary(report))
    if not report["ok"]:
        if not report.get("refused"):
            print(f"error: agreement outside the tolerances (QNN vs onnxruntime {report['tol_ort']:.2g}, vs the JAX student "
                  f"{qnn.TOL_STUDENT:g}, EPContext {qnn.TOL_CONTEXT:g})", file=sys.stderr)
        else:
            print(f"error: QNN HTP refused {len(report['refused'])} node(s): {', '.join(report['refused'][:20])}",
                  file=sys.stderr)
        raise SystemExit(1)
    _write_pipeline_manifest(teacher, cfg, args, report)  # pipeline.json for fraqat_jax.deploy
    return report


def _spread(items, num: int) -> list:
    """``num`` of ``items`` evenly spaced (all of them when there are fewer)."""
    items = list(items)
    return items if len(items) <= num else [items[round(i * len(items) / num)] for i in range(num)]


def _export_qnn_pipeline(parts, args) -> dict:
    """``--format qnn`` on a text-to-image run: the pipeline folder (text encoder, the student
    transformer, VAE decoder, tokenizer, constants, pipeline.json; see
    fraqat_jax.export.qnn_pipeline), the text encoder and decoder at ``--component-bits``; exit 1
    when HTP does not take a network whole or an agreement fails."""
    from fraqat_jax.export import qnn, qnn_pipeline

    if args.batch_size != 1 or args.product_bits != 16:
        raise ExportError("--batch-size and --product-bits apply to a one-network folder; a text-to-image pipeline "
                          "folder runs each network at batch 1 with 16-bit products")
    bits = DEFAULT_COMPONENT_BITS if args.component_bits is None else args.component_bits
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)  # an earlier qnn export (checked above)
    try:
        report = qnn_pipeline.export_image_pipeline(
            parts.text_encoder, parts.transformer, parts.vae_decoder, parts.tokenizer_file, args.out,
            prompts=_spread(parts.prompts, PIPELINE_PROMPTS), heldout_prompts=_spread(parts.heldout_prompts,
                                                                                      PIPELINE_HELDOUT_PROMPTS),
            text_length=parts.text_length, sampler=parts.sampler, latent_shape=parts.latent_shape, pad_id=parts.pad_id,
            lowercase=parts.lowercase, soc=args.soc, component_bits=bits)
    except qnn.QnnRefused as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except qnn.OnnxExportError as e:
        raise ExportError(str(e)) from None
    report = {**report, "transformer": parts.transformer, "component_bits": bits}
    print(_pipeline_summary(report, args.out))
    failed = [name for name, f in report["figures"].items()
              if not (f["max_rel_diff_ort"] <= f["tol_ort"] and f["max_rel_diff_student"] <= qnn.TOL_STUDENT
                      and f["max_rel_diff_context"] <= qnn.TOL_CONTEXT)]
    if failed:
        print(f"error: {', '.join(failed)}: agreement outside the tolerances (QNN vs onnxruntime: qnn.json's tol_ort, "
              f"vs the JAX networks {qnn.TOL_STUDENT:g}, EPContext {qnn.TOL_CONTEXT:g})", file=sys.stderr)
        raise SystemExit(1)
    return report


def _pipeline_summary(report, out: str) -> str:
    """The pipeline export's figures, one line per network."""
    bits = report["component_bits"]
    precision = {"text_encoder": f"W{bits}A16", "transformer": "W4A8 (trained, uint16 products)",
                 "vae_decoder": f"W{bits}A16"}
    lines = [f"wrote a text-to-image pipeline folder to {out} (SoC {report['manifest']['soc']['name']}, HTP "
             f"v{report['manifest']['soc']['htp_arch']}, CPU fallback disabled):"]
    for name, f in report["figures"].items():
        lines.append(f"  {name} {precision[name]}: {f['nodes_on_qnn']}/{f['nodes']} nodes on QNN HTP; max |diff| / "
                     f"max vs onnxruntime CPU {f['max_rel_diff_ort']:.2e} (tolerance {f['tol_ort']:.2g}), vs JAX {f['max_rel_diff_student']:.2e}, "
                     f"EPContext {f['max_rel_diff_context']:.1e}; context {f['context_bytes']} bytes (bf16 weights "
                     f"{f['weight_bytes_bf16']} bytes), built in {f['context_build_seconds']:g} s")
    lines.append(f"run it with python -m fraqat_jax.deploy {out} --prompt TEXT --out IMAGE.png")
    return "\n".join(lines)


def _export_qnn_text(teacher, student, cfg, args) -> dict:
    """``--format qnn`` on a language-model run: the generation folder (prefill and decode graphs,
    shared HTP context, tokenizer, pipeline.json; see fraqat_jax.export.qnn_text); exit 1 when HTP
    does not take a graph whole or the logits disagree with the JAX student."""
    from fraqat_jax.export import qnn_text

    try:
        qnn_text.lengths(dict(student.config), args.prefill_len, args.context_len)
    except ValueError as e:
        raise ExportError(str(e)) from None
    windows = [np.asarray(b["input_ids"]) for b in calibration_batches(teacher, cfg, num_samples=8, batch_size=8,
                                                                        seed=0)]
    held = [np.asarray(b["input_ids"]) for b in calibration_batches(teacher, cfg, num_samples=10, batch_size=10,
                                                                     seed=1)]
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)  # an earlier qnn export (checked above)
    report = qnn_text.export_text_qnn(student, args.out, tokenizer_from=family_for_model(teacher).teacher_folder(cfg),
                                      calibration_windows=[r for w in windows for r in w],
                                      heldout_windows=[r for w in held for r in w], soc=args.soc,
                                      product_bits=args.product_bits, prefill_len=args.prefill_len,
                                      context_len=args.context_len)
    print(qnn_text.summary(report))
    if not report["ok"]:
        print(f"error: the QNN graphs disagree with the JAX student beyond {qnn_text.TOL_LOGITS:g} x max|logits|"
              if not report.get("refused") else f"error: QNN HTP refused nodes: {report['refused']}", file=sys.stderr)
        raise SystemExit(1)
    return report


def _write_pipeline_manifest(teacher, cfg, args, report) -> None:
    """``pipeline.json`` of a one-network folder (see fraqat_jax.export.qnn_pipeline)."""
    from fraqat_jax.export.qnn_pipeline import write_single_manifest

    settings = family_for_model(teacher).single_network_manifest(cfg, dict(teacher.config))
    print(f"wrote {write_single_manifest(args.out, report, settings)}: run it with python -m fraqat_jax.deploy {args.out}")


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


def _export_diffusers(teacher, student, cfg, args) -> dict:
    """``--format diffusers``: the student's fake-quantized weights in diffusers' layout (bfloat16);
    for a run whose teacher is a whole pipeline folder, that pipeline with the student (float32)
    as its ``transformer/``, which the diffusers pipeline class loads and runs from a prompt."""
    from fraqat_jax.family import family_for_model

    family = family_for_model(teacher)
    write = getattr(family, "write_pipeline", None)
    info = write(cfg, args.out, lambda d: export_diffusers(student, d, dtype=jnp.float32)) if write else None
    if info is not None:
        info["max_rel_diff_vs_float_activations"] = _read_back_diff(teacher, student, cfg, family, info["path"])
        print(f"wrote a {info['pipeline_class']} folder to {args.out}: transformer/ the student ({info['tensors']} "
              f"tensors, {info['bytes']} bytes, float32, fake-quantized weights), {', '.join(info['parts'])} from "
              f"the teacher's pipeline; transformer/ read back vs the student with float activations: max |diff| / "
              f"max = {info['max_rel_diff_vs_float_activations']:.2e} (tolerance {TOLERANCE:g})")
        if info["max_rel_diff_vs_float_activations"] > TOLERANCE:
            print("error: the exported transformer disagrees with the student beyond the tolerance", file=sys.stderr)
            raise SystemExit(1)
        return info
    info = export_diffusers(student, args.out)
    print(f"wrote {info['tensors']} tensors ({info['bytes']} bytes, bfloat16, fake-quantized weights) "
          f"and config.json to {args.out}")
    return info


def _read_back_diff(teacher, student, cfg, family, folder: str) -> float:
    """max |exported transformer - student with float activations| / max |student|, on held-out
    training-style inputs (the folder's ``transformer/`` read back with the port)."""
    import jax
    import numpy as np
    from flax import nnx

    from fraqat_jax.export.transformers import float_activation_copy
    from fraqat_jax.models import from_diffusers

    batches = calibration_batches(teacher, cfg, num_samples=4, batch_size=4, seed=1)

    def outputs(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda st, b: family.apply(nnx.merge(graphdef, st), b))
        return [np.asarray(fn(state, b), np.float64) for b in batches]

    got = outputs(from_diffusers(os.path.join(folder, "transformer")))
    ref = outputs(float_activation_copy(student))
    scale = max(max(float(np.abs(r).max()) for r in ref), 1e-12)
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) / scale


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
                        "HTP runs whole, its compiled HTP context (model_ctx.onnx), qnn.json and pipeline.json, "
                        "checked on the QNN HTP simulator (needs the qnn extra); on a text-to-image run, the "
                        "pipeline folder: text_encoder/, transformer/ and vae_decoder/ each so, the tokenizer and "
                        "the constants")
    p.add_argument("--soc", default="sm8750", type=str.lower,
                   help="--format qnn: the Snapdragon SoC the HTP context is compiled for: sm8750 (HTP v79, "
                        "Snapdragon 8 Elite, default), sm8650 (v75), sm8550 (v73), sm8850 (v81)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="--format qnn: the graph's fixed batch size (QNN HTP needs static shapes; default 1)")
    p.add_argument("--product-bits", type=int, default=16,
                   help="--format qnn: width of a W4A8 layer's product on HTP: 16 (default: the trained uint8 "
                        "input carried exactly in uint16, a uint16 output; meets the agreement tolerances) or 8 "
                        "(HTP's 8-bit kernels, every product rounded to 256 levels; see docs/deploy.md)")
    p.add_argument("--prefill-len", type=int, default=None,
                   help="--format qnn on a language-model run: tokens of the prefill graph (default 128, below "
                        "--context-len)")
    p.add_argument("--context-len", type=int, default=None,
                   help="--format qnn on a language-model run: the context length of both graphs (default "
                        "min(512, max_position_embeddings))")
    p.add_argument("--component-bits", type=int, choices=(8, 4), default=None,
                   help="--format qnn on a text-to-image run: weight bits of the text encoder and the VAE decoder, "
                        "quantized after training (per output channel) with 16-bit activations calibrated on the "
                        "training prompts and the sampler's own latents: 8 (W8A16, as Qualcomm AI Hub ships its "
                        "diffusion pipelines; default) or 4 (W4A16). The transformer is the trained W4A8 student")
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
        marker = {"orbax": "meta", "diffusers": "config.json", "transformers": "config.json", "qnn": "pipeline.json"}[fmt]
        ours = os.path.isdir(os.path.join(out, marker)) if fmt == "orbax" else os.path.isfile(os.path.join(out, marker))
        ours = ours or (fmt == "diffusers" and os.path.isfile(os.path.join(out, "model_index.json")))
        ours = ours or (fmt == "qnn" and os.path.isfile(os.path.join(out, "qnn.json")))
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
        elif (args.soc != "sm8750" or args.batch_size != 1 or args.product_bits != 16 or args.prefill_len is not None
              or args.context_len is not None or args.component_bits is not None):
            raise ExportError(f"--soc, --batch-size, --product-bits, --component-bits, --prefill-len and --context-len "
                              f"apply to --format qnn, not --format {args.format}")
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
            return _export_diffusers(teacher, student, cfg, args)
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
