"""Ship a trained student: a frozen W4A8 orbax checkpoint, or dequantized weights for diffusers.

``python -m fraqat_jax.export --workdir DIR --out PATH [--format orbax|diffusers]``

``--format orbax`` (default) writes the serving form:

1. the run's final student (``fraqat_jax.train.load_run``), at its final bit-width;
2. static activation ranges calibrated as the paper does for the phone: 100 training-style inputs
   (the run's data, its noise and timesteps) pass through the model and each quantized layer's
   input range is fixed at mean +/- 3 standard deviations (``fraqat_jax.calibrate``);
3. ``fraqat_jax.freeze``: integer weight codes (two 4-bit codes per byte at <= 4 bits), float32
   scales, the static activation ranges;
4. an orbax checkpoint at ``PATH`` with two items: ``state`` (the frozen model's arrays; every
   float array other than scales and activation ranges -- biases, norms, embeddings -- in
   bfloat16; the per-output sums of the codes, derived data, are recomputed at load) and ``meta`` (model class, diffusers config, quantization rules, each layer's bits
   and activation granularity, sizes and the measured agreement).

:func:`load` rebuilds the frozen model from ``PATH`` (it runs and samples like the port). Its output
matches the calibrated fake-quant student within ``TOLERANCE`` (max abs difference relative to
the student's max abs output, on the calibration inputs). The difference comes from the bfloat16
storage of biases, norms and embeddings: a slightly different input can move a static 8-bit
activation code by one step, so the worst element differs by more than the bf16 rounding
(1.3e-2 measured on the default digits DiT; with float32 storage the frozen layers agree with
the fake-quant ones to 1e-4, see ``fraqat_jax.nn.freeze``). The export prints and records the
measured figure and the size ratio: the bytes of every stored array over the bytes of the same
model's parameters in bfloat16 (at most 0.27 at 4 bits).

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
import shutil
import sys
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

FORMAT_VERSION = 1
TOLERANCE = 5e-2  # measured 1.3e-2 on the default digits DiT (W4A8, static A8)
CALIBRATION_SAMPLES = 100
_FULL_PRECISION = ("kernel_scale", "kernel_zero", "act_range")  # leaves kept in float32
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
        out[path] = {
            "bits": None if layer.bits is None else float(layer.bits[...]),
            "act_bits": layer.act_bits,
            "act_granularity": layer.act_granularity,
        }
    return out


def _stored_tree(frozen) -> dict:
    """The frozen model's state as a pure dict, with bulk floats narrowed to bfloat16 and the
    derived ``kernel_code_sums`` left out (recomputed from the codes by :func:`load`)."""

    def narrow(path, x):
        x = np.asarray(x)
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        if np.issubdtype(x.dtype, np.floating) and name not in _FULL_PRECISION:
            return x.astype(jnp.bfloat16)
        return x

    return jax.tree_util.tree_map_with_path(narrow, _without(nnx.to_pure_dict(nnx.state(frozen)), _DERIVED))


def _without(tree, names):
    if not isinstance(tree, dict):
        return tree
    return {k: _without(v, names) for k, v in tree.items() if k not in names}


def _param_count(model) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _build_frozen(model_class: str, config: dict, quant_rules: str, layers: dict):
    """The frozen structure of an export (weights not yet loaded)."""
    if model_class not in MODEL_CLASSES:
        raise ExportError(f"export holds model class {model_class!r}; known: {', '.join(sorted(MODEL_CLASSES))}")
    # The structure only: built abstractly, then zeros (the stored arrays replace them).
    abstract = nnx.eval_shape(lambda: MODEL_CLASSES[model_class](dict(config), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state))
    if quant_rules != "none":
        fraqat_jax.quantize_model(model)
    for path, layer in quantized_layers(model):
        if path not in layers:
            raise ExportError(f"export metadata lacks quantized layer {path!r}")
        s = layers[path]
        if layer.bits is not None:
            layer.bits[...] = jnp.float32(s["bits"])
        layer.act_granularity = s["act_granularity"]
        if layer.act_range is not None:
            layer.act_range[...] = jnp.zeros((2,), jnp.float32)  # placeholder, restored below
    return fraqat_jax.freeze(model)


def export_orbax(teacher, student, cfg, out: str, *, num_samples: int = CALIBRATION_SAMPLES) -> dict:
    """Calibrates, freezes and saves ``student`` to ``out`` (see the module docstring); returns the metadata."""
    family = family_of(teacher)
    batches = calibration_batches(teacher, cfg, num_samples=num_samples)
    forward = _forward(family)
    if cfg.quant_rules != "none":
        fraqat_jax.calibrate(student, batches, forward=forward)
    frozen = fraqat_jax.freeze(student)
    tree = _stored_tree(frozen)
    stored_bytes = int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    bf16_bytes = 2 * _param_count(teacher)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(teacher).__name__,
        "config": dict(teacher.config),
        "family": family,
        "quant_rules": cfg.quant_rules,
        "layers": _layer_settings(student),
        "calibration": {"samples": num_samples, "range": "mean +/- 3 std of each quantized layer's input"},
        "stored_bytes": stored_bytes,
        "bf16_bytes": bf16_bytes,
        "bytes_ratio_vs_bf16": stored_bytes / bf16_bytes,
        "tolerance": TOLERANCE,
    }
    # What you train is what you serve: the model as load() will rebuild it, against the
    # calibrated fake-quant student, before anything is written.
    worst = _max_rel_diff(_fill(frozen, tree), student, batches, family)
    meta["max_rel_diff_vs_fake_quant"] = worst
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


def load(path: str) -> nnx.Module:
    """The frozen model saved by ``export`` at ``path``: call it like the port (same arguments),
    or sample it with :mod:`fraqat_jax.eval.samplers`. Floats are computed in float32."""
    meta = load_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path!r} has export format {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    frozen = _build_frozen(meta["model_class"], meta["config"], meta["quant_rules"], meta["layers"])
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
    values = jax.tree.map(lambda ref, x: jnp.asarray(x, jnp.asarray(ref).dtype), _without(full, _DERIVED), stored)
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


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fraqat_jax.export", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run directory written by python -m fraqat_jax.train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("orbax", "diffusers"), default="orbax")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES,
                   help=f"inputs for the static activation ranges (default {CALIBRATION_SAMPLES}, the paper's)")
    return p


def _check_out(out: str, fmt: str) -> None:
    out = os.path.abspath(out)
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
            teacher, student, cfg = train.load_run(args.workdir, step=args.step, ema=args.ema)
        except (ValueError, FileNotFoundError) as e:
            raise ExportError(f"no trained student in {args.workdir!r}: {e}") from None
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
