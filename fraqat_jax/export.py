"""Ship a trained student: a frozen W4A8 orbax checkpoint, or dequantized weights for diffusers.

``python -m fraqat_jax.export --workdir DIR --out PATH [--format orbax|diffusers]``

``--format orbax`` (default) writes the serving form, the model that was trained:

1. the run's final student (``fraqat_jax.train.load_run``), at its final bit-width, with the
   activation quantization it was trained with: dynamic per-token int8 ranges for
   ``act_quant=dynamic``, the calibrated ranges from its checkpoint for ``act_quant=static``;
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

``--format onnx`` writes an ONNX QDQ graph (``fraqat_jax.export_onnx``).

``--format diffusers`` writes ``PATH/config.json`` and ``PATH/diffusion_pytorch_model.safetensors``:
the student's fake-quantized weights (dequantized, bfloat16) in diffusers' layout, so diffusers
pipelines and :func:`fraqat_jax.models.from_diffusers` load the QAT'd model (full-precision
activations).

Errors (no trained student in the workdir, an output path that cannot be written, an existing
output that is not an export): one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

import fraqat_jax
from fraqat_jax import data, train
from fraqat_jax.diffusion import apply_model, family_of, heldout_inputs, model_sampler
from fraqat_jax.models import MODEL_CLASSES, to_diffusers_state_dict
from fraqat_jax.nn import FrozenLinear, quantized_layers
from fraqat_jax.nn.freeze import code_sums

FORMAT_VERSION = 2  # 2: arrays in their trained dtypes, layers keep their trained activation ranges
TOLERANCE = 1e-4  # exported vs fake-quant student, relative to max |output|, float32
CALIBRATION_SAMPLES = 100
_DERIVED = ("kernel_code_sums",)  # recomputed from the codes at load time, not stored


class ExportError(ValueError):
    """Bad input to the exporter (the message names it)."""


# ----------------------------------------------------------------------------- calibration


def calibration_batches(teacher, cfg, *, num_samples: int = CALIBRATION_SAMPLES, batch_size: int = 25, seed: int = 0):
    """``num_samples`` training-style inputs ``(x_t, t, cond)`` of the run's family, in batches.

    Clean examples come from the run's data (for a data-free run: the teacher's own samples, as the
    trainer draws them), noised as training noises them (``diffusion.heldout_inputs``).
    """
    family = family_of(teacher)
    size = int(cfg.image_size or teacher.config.get("sample_size", 8))
    shape = (int(teacher.config.get("in_channels", 4)), size, size)
    rows = None
    if cfg.data != "datafree":
        src = data.make_source(cfg.data, seed=int(cfg.seed) + seed + 7919, image_size=size,
                               data_dir=cfg.data_dir or None)
        rows = dict(src.batch(0, num_samples))
    graphdef, state = nnx.split(teacher)
    sampler = model_sampler(lambda st: nnx.merge(graphdef, st), family, num_steps=int(cfg.sample_steps))
    n_cls = teacher.config.get("num_embeds_ada_norm")
    x_t, t, cond = heldout_inputs(
        family, jax.random.key(seed + 7919), rows=rows, sample_clean=lambda n, c, k: sampler(state, n, c, k),
        num=num_samples, sample_shape=shape, num_classes=int(n_cls) if n_cls else None,
        num_train_timesteps=int(cfg.num_train_timesteps), logit_mean=float(cfg.logit_mean),
        logit_std=float(cfg.logit_std))
    return [
        (x_t[i : i + batch_size], t[i : i + batch_size], jax.tree.map(lambda a: a[i : i + batch_size], cond))
        for i in range(0, num_samples, batch_size)
    ]


def _forward(family):
    """``forward(model, (x_t, t, cond))`` -> the model's output (``calibrate``'s ``forward``)."""
    return lambda model, batch: apply_model(model, family, *batch)


def _max_rel_diff(model, reference, batches, family) -> float:
    """max |model - reference| / max |reference| over ``batches`` (each model jitted once)."""
    forward = _forward(family)

    def outputs(m):
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda st, b: forward(nnx.merge(graphdef, st), b))
        return [np.asarray(fn(state, b), np.float64) for b in batches]

    got, ref = outputs(model), outputs(reference)
    scale = max(max(float(np.abs(r).max()) for r in ref), 1e-12)
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) / scale


# ----------------------------------------------------------------------------- orbax export


def _layer_settings(student) -> dict[str, dict[str, Any]]:
    out = {}
    for path, layer in quantized_layers(student):
        axis = layer.channel_axis
        out[path] = {
            "bits": None if layer.bits is None else float(layer.bits[...]),
            "act_bits": layer.act_bits,
            "act_granularity": layer.act_granularity,
            "symmetric": layer.weight_symmetric,
            "channel_axis": list(axis) if isinstance(axis, tuple) else axis,
            "group_size": layer.group_size,
        }
    return out


def _rules_for(layers: dict) -> list:
    """One exact-path rule per quantized layer of an export (any rules the run used are reproduced),
    and a last rule that leaves every other layer as it is."""
    rules = [fraqat_jax.Rule(re.escape(path), weight_bits=8.0 if s["bits"] is not None else None,
                             act_bits=s["act_bits"], symmetric=s.get("symmetric", True),
                             channel_axis=tuple(s["channel_axis"]) if isinstance(s.get("channel_axis"), list)
                             else s.get("channel_axis"), group_size=s.get("group_size"),
                             act_granularity=s["act_granularity"] if s["act_bits"] is not None else None)
             for path, s in layers.items()]
    return rules + [fraqat_jax.Rule(".*", weight_bits=None, act_bits=None)]


def _stored_tree(frozen) -> dict:
    """The frozen model's state as a pure dict of numpy arrays in their trained dtypes, without the
    derived ``kernel_code_sums`` (recomputed from the codes by :func:`load`)."""
    return jax.tree.map(np.asarray, _without(nnx.to_pure_dict(nnx.state(frozen)), _DERIVED))


def _without(tree, names):
    if not isinstance(tree, dict):
        return tree
    return {k: _without(v, names) for k, v in tree.items() if k not in names}


def _param_count(model) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _build_frozen(model_class: str, config: dict, quant_rules: str, layers: dict, dtype: str | None = None,
                  param_dtype: str | None = None, *, integer: bool = False):
    """The frozen structure of an export (weights not yet loaded); ``integer`` as in ``freeze``."""
    if model_class not in MODEL_CLASSES:
        raise ExportError(f"export holds model class {model_class!r}; known: {', '.join(sorted(MODEL_CLASSES))}")
    # The structure only: built abstractly, then zeros (the stored arrays replace them).
    dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    abstract = nnx.eval_shape(lambda: MODEL_CLASSES[model_class](
        dict(config), rngs=nnx.Rngs(0), dtype=dtypes.get(dtype), param_dtype=dtypes.get(param_dtype, jnp.float32)))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state))
    if quant_rules != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the catch-all rule may match nothing
            model = fraqat_jax.quantize_model(model, _rules_for(layers))
    for path, layer in quantized_layers(model):
        if path not in layers:
            raise ExportError(f"export metadata lacks quantized layer {path!r}")
        s = layers[path]
        if layer.bits is not None:
            layer.bits[...] = jnp.float32(s["bits"])
        layer.act_granularity = s["act_granularity"]
        if layer.act_range is not None:
            layer.act_range[...] = jnp.zeros((2,), jnp.float32)  # placeholder, restored below
    return fraqat_jax.freeze(model, integer=integer)


def export_orbax(teacher, student, cfg, out: str, *, num_samples: int = CALIBRATION_SAMPLES) -> dict:
    """Freezes and saves ``student`` to ``out`` (see the module docstring); returns the metadata."""
    family = family_of(teacher)
    forward = _forward(family)
    layers = quantized_layers(student)
    uncalibrated = [p for p, layer in layers if layer.act_granularity == "static" and layer.act_bits is not None
                    and not bool(jnp.isfinite(layer.act_range[...]).all())]
    if uncalibrated:
        raise ExportError(f"static student without calibrated input ranges (layers {uncalibrated[:3]}...): "
                          "train with act_quant=static, which calibrates before the first step")
    dynamic = any(layer.act_bits is not None and layer.act_granularity != "static" for _, layer in layers)
    if dynamic:  # ranges for static-only runtimes; the served JAX model keeps its trained ranges
        fraqat_jax.calibrate(student, calibration_batches(teacher, cfg, num_samples=num_samples), forward=forward,
                             switch_to_static=False)
    frozen = fraqat_jax.freeze(student, integer=False)
    tree = _stored_tree(frozen)
    stored_bytes = int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    bf16_bytes = 2 * _param_count(teacher)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(teacher).__name__,
        "config": dict(teacher.config),
        "family": family,
        "quant_rules": cfg.quant_rules,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "layers": _layer_settings(student),
        "act_quant": "dynamic" if dynamic else "static",
        "calibration": {"samples": num_samples if dynamic else None,
                        "range": "mean +/- 3 std of each quantized layer's input, integer zero point",
                        "used_by": "static runtimes (onnx)" if dynamic else "the served model (trained ranges)"},
        "stored_bytes": stored_bytes,
        "bf16_bytes": bf16_bytes,
        "bytes_ratio_vs_bf16": stored_bytes / bf16_bytes,
        "tolerance": TOLERANCE,
    }
    # What you train is what you serve: the model as load() will rebuild it, against the
    # fake-quant student, on held-out inputs drawn as training draws them, before anything is written.
    check = calibration_batches(teacher, cfg, num_samples=min(num_samples, 50), seed=1)
    worst = _max_rel_diff(_fill(frozen, tree), student, check, family)
    meta["max_rel_diff_vs_fake_quant"] = worst
    meta["max_rel_diff_integer_matmul"] = _max_rel_diff(_fill(fraqat_jax.freeze(student), tree), student, check,
                                                        family)
    if worst > TOLERANCE:
        raise RuntimeError(f"exported model differs from the fake-quant student by {worst:.3g} (relative), "
                           f"above the tolerance {TOLERANCE}")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(os.path.abspath(out), ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    ckptr.close()
    return meta


def load_metadata(path: str) -> dict:
    """The ``meta`` item of an export."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "meta")):
        raise ExportError(f"{path!r} is not a fraqat_jax export (no meta item)")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        return ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        ckptr.close()


def load(path: str, *, integer: bool = False, static: bool = False) -> nnx.Module:
    """The frozen model saved by ``export`` at ``path``: call it like the port (same arguments),
    or sample it with ``fraqat_jax.diffusion.samplers``. It computes like the trained student, bit for
    bit on symmetric weights; ``integer=True`` multiplies the integer codes instead (int8 x int8 ->
    int32, see ``fraqat_jax.freeze``), within ``meta["max_rel_diff_integer_matmul"]`` of it.
    ``static=True`` serves every quantized input with its stored static range (what the ONNX graph
    runs) even when the student was trained with dynamic ranges."""
    meta = load_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path!r} has export format {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    layers = meta["layers"]
    if static:
        layers = {p: {**s, "act_granularity": "static"} if s["act_bits"] is not None else s for p, s in layers.items()}
    frozen = _build_frozen(meta["model_class"], meta["config"], meta["quant_rules"], layers, meta.get("dtype"),
                           meta.get("param_dtype"), integer=integer)
    template = _stored_tree(frozen)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        stored = ckptr.restore(os.path.abspath(path), ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        ckptr.close()
    return _fill(frozen, stored)


def _fill(frozen, stored) -> nnx.Module:
    """``frozen`` with the stored arrays, floats widened back to the structure's dtypes."""
    graphdef, state = nnx.split(frozen)
    full = nnx.to_pure_dict(state)
    values = jax.tree.map(lambda ref, x: jnp.asarray(x), _without(full, _DERIVED), stored)  # trained dtypes
    nnx.replace_by_pure_dict(state, values)
    model = nnx.merge(graphdef, state)
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, FrozenLinear) and layer.kernel_code_sums is not None:
            layer.kernel_code_sums[...] = code_sums(layer.kernel_codes[...], layer.kernel_shape,
                                                     layer.group_size or layer.kernel_shape[0], layer.packed)
    return model


# ----------------------------------------------------------------------------- diffusers export


def fake_quantized_copy(student) -> nnx.Module:
    """A copy of ``student`` whose quantized kernels hold their fake-quantized values."""
    graphdef, state = nnx.split(student)

    @jax.jit
    def quantized_state(state):
        model = nnx.merge(graphdef, state)
        for _, layer in quantized_layers(model):
            if layer.bits is not None:
                layer.kernel[...] = layer.quantized_kernel()
        return nnx.state(model)

    return nnx.merge(graphdef, quantized_state(state))


def export_diffusers(student, out: str) -> dict:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (bfloat16) to ``out``."""
    tensors = to_diffusers_state_dict(fake_quantized_copy(student))
    tensors = {k: np.ascontiguousarray(v.astype(jnp.bfloat16)) for k, v in tensors.items()}
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {"_class_name": type(student).__name__, "_diffusers_version": "0.32.0", **dict(student.config)}
    config["_class_name"] = type(student).__name__
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    n_bytes = int(sum(v.nbytes for v in tensors.values()))
    return {"tensors": len(tensors), "bytes": n_bytes}


def _export_onnx(teacher, student, cfg, args) -> dict:
    """``--format onnx``: static input ranges (the trained ones, or calibrated for a dynamically
    trained student), then the QDQ graph checked by onnxruntime against the frozen JAX model."""
    try:
        from fraqat_jax.export_onnx import OnnxExportError, export_onnx_run, summary
    except ImportError as e:
        raise ExportError(f"--format onnx needs the onnx extra: pip install 'fraqat_jax[onnx]' ({e})") from None
    family = family_of(teacher)
    if any(layer.act_bits is not None and not bool(jnp.isfinite(layer.act_range[...]).all())
           for _, layer in quantized_layers(student)):
        print("note: the student was trained with dynamic activation ranges; the ONNX graph uses static ranges "
              "calibrated now (train with --set act_quant=static for a phone model that is the trained one)")
        fraqat_jax.calibrate(student, calibration_batches(teacher, cfg, num_samples=args.calibration_samples),
                             forward=_forward(family), switch_to_static=False)
    held_out = calibration_batches(teacher, cfg, num_samples=6, batch_size=6, seed=1)[0]
    try:
        report = export_onnx_run(student, family, held_out, args.out)
    except OnnxExportError as e:
        raise ExportError(str(e)) from None
    print(summary(report))
    return report


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fraqat_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run directory written by python -m fraqat_jax.train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("orbax", "diffusers", "onnx"), default="orbax",
                   help="orbax: frozen W4A8 checkpoint (load with fraqat_jax.export.load); diffusers: dequantized "
                        "bf16 folder; onnx: one QDQ .onnx file (INT4 weights, static uint8 inputs) for phone "
                        "runtimes (needs the onnx extra)")
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
        ours = os.path.isdir(os.path.join(out, "meta")) if fmt == "orbax" else os.path.isfile(os.path.join(out, "config.json"))
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
        _check_out(args.out, args.format)
        if not os.path.isdir(args.workdir):
            raise ExportError(f"--workdir {args.workdir!r} does not exist")
        try:
            teacher, student, cfg = train.load_run(args.workdir, step=args.step, ema=args.ema, unscan=True,
                                                  attention="xla")
        except (ValueError, FileNotFoundError) as e:
            raise ExportError(f"no trained student in {args.workdir!r}: {e}") from None
        if args.format == "onnx":
            return _export_onnx(teacher, student, cfg, args)
        if args.format == "diffusers":
            info = export_diffusers(student, args.out)
            print(f"wrote {info['tensors']} tensors ({info['bytes']} bytes, bfloat16, fake-quantized weights) "
                  f"and config.json to {args.out}")
            return info
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)  # an earlier export (checked above): orbax writes a fresh directory
        meta = export_orbax(teacher, student, cfg, args.out, num_samples=args.calibration_samples)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    bits = sorted({s["bits"] for s in meta["layers"].values() if s["bits"] is not None})
    print(f"exported W{'/'.join(f'{b:g}' for b in bits)}A8 model to {args.out}: {meta['stored_bytes']} bytes = "
          f"{meta['bytes_ratio_vs_bf16']:.3f} x the bf16 weights ({meta['bf16_bytes']} bytes); "
          f"max |exported - fake-quant| / max |fake-quant| = {meta['max_rel_diff_vs_fake_quant']:.2e} "
          f"(tolerance {TOLERANCE:g})")
    return meta


if __name__ == "__main__":
    main()
