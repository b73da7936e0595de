"""The orbax export: a run's student frozen to integer codes, checked, written and loaded back.

:func:`export_orbax` calibrates static ranges for a dynamically trained student, freezes it
(``fraqat_jax.freeze``), checks the frozen model against the fake-quant student on held-out
training-style inputs within :data:`TOLERANCE` of its max abs output, and writes an orbax
checkpoint with two items, ``state`` (the frozen arrays in their trained dtypes) and ``meta``; a
language model's export also holds ``tokenizer/`` (:func:`bundle_tokenizer`: the tokenizer and the
generation config), so ``python -m fraqat_jax.generate --workdir EXPORT`` needs nothing else.
:func:`load` rebuilds the frozen model. :func:`export_diffusers` writes dequantized bfloat16
weights in diffusers' layout. See :mod:`fraqat_jax.export` for the command line.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors.numpy import save_file

import fraqat_jax
from fraqat_jax.data.streams import stream
from fraqat_jax.family import FamilyError, family_for_model, family_named
from fraqat_jax.models import to_diffusers_state_dict
from fraqat_jax.nn import FrozenLinear, quantized_layers
from fraqat_jax.nn.freeze import code_sums
from fraqat_jax.quant import rel_diff

FORMAT_VERSION = 2  # 2: arrays in their trained dtypes, layers keep their trained activation ranges
TOLERANCE = 1e-4  # exported vs fake-quant student, relative to max |output|, float32
CALIBRATION_SAMPLES = 100
_DERIVED = ("kernel_code_sums", "kernel_float", "kernel_unpacked")  # recomputed from the codes at load time, not stored


class ExportError(ValueError):
    """Bad input to the exporter (the message names it)."""


# ----------------------------------------------------------------------------- calibration


def calibration_batches(teacher, cfg, *, num_samples: int = CALIBRATION_SAMPLES, batch_size: int = 25, seed: int = 0):
    """``num_samples`` training-style inputs of the run's family (diffusion: ``(x_t, t, cond)``), in
    batches: the family's :meth:`~fraqat_jax.family.Family.calibration_inputs` on the run's data (for
    a data-free run: the teacher's own samples, as the trainer draws them), from the ``export``
    random stream of ``seed``."""
    family = family_for_model(teacher)
    config = dict(teacher.config)
    graphdef, state = nnx.split(teacher)
    sample_teacher = None
    if family.can_sample:  # data-free data is the teacher's samples
        sampler = family.teacher_sampler(cfg, lambda st: nnx.merge(graphdef, st), guidance_scale=1.0)
        sample_teacher = lambda prompts: sampler(state, prompts)  # noqa: E731
    rows = None
    if cfg.data != "datafree":
        source = family.make_source(cfg, config, seed=stream(int(cfg.seed) + seed, "export"))
        rows = dict(source.batch(0, num_samples))
    return family.calibration_inputs(cfg, config, rows, jax.random.key(stream(seed, "export")), num_samples,
                                     batch_size, sample_teacher)


def model_forward(family):
    """``forward(model, inputs)`` -> the model's output (``calibrate``'s ``forward``); ``family`` a
    family name or :class:`fraqat_jax.family.Family`."""
    if isinstance(family, str):
        family = family_named(family)
    return family.apply


def _outputs(model, batches, forward) -> list[np.ndarray]:
    """``forward(model, batch)`` for each of ``batches`` (the model jitted once), float64."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, b: forward(nnx.merge(graphdef, st), b))
    return [np.asarray(fn(state, b), np.float64) for b in batches]


# ----------------------------------------------------------------------------- orbax export


def _layer_settings(student) -> dict[str, dict[str, Any]]:
    out = {}
    for path, layer in quantized_layers(student):
        axis = layer.channel_axis
        out[path] = {
            "bits": None if layer.weight_bits is None else float(layer.weight_bits[...]),  # file format 2's word
            "act_bits": layer.act_bits,
            "act_ranges": layer.act_ranges,
            "act_granularity": layer.act_granularity,
            "symmetric": layer.weight_symmetric,
            "channel_axis": list(axis) if isinstance(axis, tuple) else axis,
            "group_size": layer.group_size,
        }
    return out


def _layer_entry(s: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's export settings in today's words: the file says ``bits`` for ``weight_bits``, and
    exports written before ``act_ranges`` existed say ``act_granularity="static"`` for static ranges."""
    s = dict(s)
    if "weight_bits" not in s:
        s["weight_bits"] = s.pop("bits", None)
    if s.get("act_granularity") == "static":
        s["act_ranges"], s["act_granularity"] = "static", None
    s.setdefault("act_ranges", "dynamic")
    return s


def _rules_for(layers: dict) -> list:
    """One exact-path rule per quantized layer of an export (any rules the run used are reproduced),
    and a last rule that leaves every other layer as it is."""
    rules = [fraqat_jax.Rule(re.escape(path), weight_bits=8.0 if s["weight_bits"] is not None else None,
                             act_bits=s["act_bits"], symmetric=s.get("symmetric", True),
                             channel_axis=tuple(s["channel_axis"]) if isinstance(s.get("channel_axis"), list)
                             else s.get("channel_axis"), group_size=s.get("group_size"),
                             act_granularity=s["act_granularity"] if s["act_bits"] is not None else None,
                             act_ranges=s["act_ranges"] if s["act_bits"] is not None else "dynamic")
             for path, s in layers.items()]
    return rules + [fraqat_jax.Rule(".*", weight_bits=None, act_bits=None)]


def _stored_tree(frozen) -> dict:
    """The frozen model's state as a pure dict of numpy arrays in their trained dtypes, without the
    derived ``kernel_code_sums``, ``kernel_float`` and ``kernel_unpacked`` (recomputed from the codes by
    :func:`load`)."""
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
    try:
        cls = family_for_model(model_class).port(model_class)
    except FamilyError as e:
        raise ExportError(f"export holds model class {model_class!r}, which no family drives: {e}") from None
    # The structure only: built abstractly, then zeros (the stored arrays replace them).
    dtypes = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    abstract = nnx.eval_shape(lambda: cls(
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
        if layer.weight_bits is not None:
            layer.weight_bits[...] = jnp.float32(s["weight_bits"])
        if layer.act_range is not None:
            layer.act_range[...] = jnp.zeros((2,), jnp.float32)  # placeholder, restored below
    return fraqat_jax.freeze(model, integer=integer)


def export_orbax(teacher, student, cfg, out: str, *, num_samples: int = CALIBRATION_SAMPLES) -> dict:
    """Freezes and saves ``student`` to ``out`` (see the module docstring); returns the metadata."""
    family = family_for_model(teacher)
    forward = family.apply
    layers = quantized_layers(student)
    uncalibrated = [p for p, layer in layers if layer.act_ranges == "static" and layer.act_bits is not None
                    and not bool(jnp.isfinite(layer.act_range[...]).all())]
    if uncalibrated:
        raise ExportError(f"static student without calibrated input ranges (layers {uncalibrated[:3]}...): "
                          "train with act_ranges=static, which calibrates before the first step")
    dynamic = any(layer.act_bits is not None and layer.act_ranges != "static" for _, layer in layers)
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
        "family": family.name,
        "quant_rules": cfg.quant_rules,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "layers": _layer_settings(student),
        "act_ranges": "dynamic" if dynamic else "static",
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
    reference = _outputs(student, check, forward)
    worst = rel_diff(_outputs(_fill(frozen, tree), check, forward), reference)
    meta["max_rel_diff_vs_fake_quant"] = worst
    meta["max_rel_diff_integer_matmul"] = rel_diff(_outputs(_fill(fraqat_jax.freeze(student), tree), check, forward),
                                                   reference)
    if worst > TOLERANCE:
        raise RuntimeError(f"exported model differs from the fake-quant student by {worst:.3g} (relative), "
                           f"above the tolerance {TOLERANCE}")
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(os.path.abspath(out), ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    ckptr.close()
    teacher_folder = getattr(family_for_model(teacher), "teacher_folder", None)
    bundle_tokenizer(teacher_folder(cfg) if teacher_folder else None, dict(teacher.config), out)
    return meta


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def bundle_tokenizer(folder: str | None, config: Mapping[str, Any], out: str) -> str | None:
    """Copies a language model's tokenizer files (:data:`TOKENIZER_FILES` that ``folder`` has) and
    its ``generation_config.json`` (written from ``config``'s special tokens when the folder has
    none) to ``out/tokenizer``, so the export generates on its own; None when ``folder`` has no
    ``tokenizer.json``."""
    import shutil

    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    bundle = os.path.join(out, "tokenizer")
    os.makedirs(bundle, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(bundle, name))
    if not os.path.isfile(os.path.join(bundle, "generation_config.json")):
        tokens = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        with open(os.path.join(bundle, "generation_config.json"), "w") as f:
            json.dump(tokens, f, indent=1)
    with open(os.path.join(bundle, "config.json"), "w") as f:  # the tokenizer folder names its model
        json.dump(dict(config), f, indent=1)
    return bundle


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
    bit on symmetric weights (its float kernels rebuilt from the codes once, here); ``integer=True`` multiplies the integer codes instead (int8 x int8 ->
    int32, see ``fraqat_jax.freeze``), within ``meta["max_rel_diff_integer_matmul"]`` of it.
    ``static=True`` serves every quantized input with its stored static range (what the ONNX graph
    runs) even when the student was trained with dynamic ranges."""
    meta = load_metadata(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path!r} has export format {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    layers = {p: _layer_entry(s) for p, s in meta["layers"].items()}
    if static:
        layers = {p: {**s, "act_ranges": "static"} if s["act_bits"] is not None else s for p, s in layers.items()}
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
        if isinstance(layer, FrozenLinear) and layer.kernel_float is not None:
            layer.kernel_float[...] = layer.fake_quant_kernel()  # once here, not at every call
        if isinstance(layer, FrozenLinear) and layer.kernel_unpacked is not None:
            layer.kernel_unpacked[...] = layer.unpacked_codes()  # likewise
    return model


# ----------------------------------------------------------------------------- diffusers export


def fake_quantized_copy(student) -> nnx.Module:
    """A copy of ``student`` whose quantized kernels hold their fake-quantized values."""
    graphdef, state = nnx.split(student)

    @jax.jit
    def quantized_state(state):
        model = nnx.merge(graphdef, state)
        for _, layer in quantized_layers(model):
            if layer.weight_bits is not None:
                layer.kernel[...] = layer.quantized_kernel()
        return nnx.state(model)

    return nnx.merge(graphdef, quantized_state(state))


def export_diffusers(student, out: str, *, dtype=jnp.bfloat16) -> dict:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (in ``dtype``) to ``out``."""
    tensors = to_diffusers_state_dict(fake_quantized_copy(student))
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {"_class_name": type(student).__name__, "_diffusers_version": "0.32.0", **dict(student.config)}
    config["_class_name"] = type(student).__name__
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    n_bytes = int(sum(v.nbytes for v in tensors.values()))
    return {"tensors": len(tensors), "bytes": n_bytes}
