"""ONNX QDQ export: every family's tiny config, run by onnxruntime against the frozen
JAX model; INT4 initializers hold ``freeze``'s packed codes; one initializer per shared layer."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

import fraqat_jax  # noqa: E402
from fraqat_jax.diffusion import model_kwargs  # noqa: E402
from fraqat_jax.export.onnx import (OnnxExportError, export_onnx, export_onnx_run, frozen_layers,  # noqa: E402
                                    frozen_output, run_onnx, static_view, summary, to_onnx)
from fraqat_jax.models import MODEL_CLASSES  # noqa: E402
from fraqat_jax.nn import quantized_layers  # noqa: E402

TOLERANCE = 1e-3  # max |onnxruntime - frozen JAX| / max |frozen JAX|
W4A8 = fraqat_jax.Rule(".*", weight_bits=4, act_bits=8, channel_axis=-1, layer_types=("Linear",))
# Sana's feed-forward convolutions too (1x1, depthwise 3x3, 1x1): the quantized Conv path.
CONV_W4A8 = fraqat_jax.Rule(r".*\.ff\..*", weight_bits=4, act_bits=8, channel_axis=-1, layer_types=("Conv",))

# Tiny configs of tests/models (diffusers-compatible), one per family.
CONFIGS = {
    "dit": ("DiTTransformer2DModel", dict(sample_size=8, patch_size=2, in_channels=3, out_channels=6, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)),
    "pixart": ("PixArtTransformer2DModel", dict(num_attention_heads=3, attention_head_dim=4, in_channels=4,
                                                out_channels=6, num_layers=1, cross_attention_dim=12,
                                                caption_channels=12, sample_size=8, patch_size=2,
                                                interpolation_scale=None, use_additional_conditions=True)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=1, in_channels=3, out_channels=5, num_layers=2,
                                          attention_head_dim=4, num_attention_heads=4, joint_attention_dim=8,
                                          caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=14,
                                          dual_attention_layers=(0,), qk_norm="rms_norm")),
    "sana": ("SanaTransformer2DModel", dict(in_channels=3, out_channels=5, num_attention_heads=3, attention_head_dim=4,
                                            num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=6,
                                            cross_attention_dim=12, caption_channels=10, mlp_ratio=2.0, sample_size=8,
                                            patch_size=2, interpolation_scale=1, attention_bias=True,
                                            qk_norm="rms_norm_across_heads", guidance_embeds=True)),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=4, out_channels=6, num_layers=1,
                                            num_single_layers=1, attention_head_dim=8, num_attention_heads=3,
                                            joint_attention_dim=10, pooled_projection_dim=6, guidance_embeds=True,
                                            axes_dims_rope=(2, 2, 4))),
}


def _inputs(family: str, config: dict, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Keyword arguments of one call, as the trainer draws them (float32; labels int32)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    size = config.get("sample_size", 8)
    image = normal(batch, config["in_channels"], size, size)
    t = rng.uniform(0, 999, (batch,)).astype(np.float32)
    if family == "dit":
        return dict(hidden_states=image, timestep=t, class_labels=rng.integers(0, 11, (batch,)).astype(np.int32))
    if family in ("pixart", "sana"):
        mask = np.ones((batch, 5), np.float32)
        mask[:, 3:] = 0.0  # padded caption tokens
        out = dict(hidden_states=image, encoder_hidden_states=normal(batch, 5, config["caption_channels"]),
                   timestep=t, encoder_attention_mask=mask)
        if config.get("guidance_embeds"):
            out["guidance"] = rng.uniform(1, 8, (batch,)).astype(np.float32)
        if config.get("use_additional_conditions"):  # PixArt-alpha's size conditioning: a nested dict
            out["added_cond_kwargs"] = {"resolution": rng.uniform(256, 1024, (batch, 2)).astype(np.float32),
                                        "aspect_ratio": rng.uniform(0.5, 2, (batch, 1)).astype(np.float32)}
        return out
    if family == "sd3":
        return dict(hidden_states=image, encoder_hidden_states=normal(batch, 5, config["joint_attention_dim"]),
                    pooled_projections=normal(batch, config["pooled_projection_dim"]), timestep=t)
    grid = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    img_ids = np.concatenate([np.zeros((16, 1)), grid], 1).astype(np.float32)
    return dict(hidden_states=normal(batch, 16, config["in_channels"]),
                encoder_hidden_states=normal(batch, 5, config["joint_attention_dim"]),
                pooled_projections=normal(batch, config["pooled_projection_dim"]), timestep=t / 1000.0,
                img_ids=img_ids, txt_ids=np.zeros((5, 3), np.float32),
                guidance=rng.uniform(1, 8, (batch,)).astype(np.float32))


def _random_model(class_name: str, config: dict, seed: int = 0):
    """The port with random numpy weights (no zero-initialised modulation), built without running
    its initialisers (fast on a busy CPU)."""
    cls = MODEL_CLASSES[class_name]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        if len(leaf.shape) >= 2:
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return (1.0 if name == "scale" else 0.0) + 0.1 * noise

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _nudge(model) -> None:
    """Moves each static range by under one step so that its zero point is an integer, by the
    formula written out here (``calibrate`` nudges its ranges too; the hand-set ranges need it;
    idempotent)."""
    for _, layer in quantized_layers(model):
        if layer.act_range is None:
            continue
        lo, hi = np.asarray(layer.act_range[...], np.float32)
        scale = np.float32(hi - lo) / np.float32(255.0)
        zero = np.clip(np.round(-lo / scale), 0, 255)
        layer.act_range[...] = jnp.asarray([-zero * scale, (255 - zero) * scale], jnp.float32)


def _student(family: str, seed: int = 0):
    """W4A8 student with static input ranges: calibrated (DiT), or a fixed asymmetric range for
    every layer (the other families: same export path, one JAX compilation fewer on a shared CPU)."""
    class_name, config = CONFIGS[family]
    rules = [W4A8, CONV_W4A8] if family == "sana" else [W4A8]
    model = fraqat_jax.quantize_model(_random_model(class_name, config, seed), rules)
    if family == "dit":
        fraqat_jax.calibrate(model, [_inputs(family, config, 8, seed=100 + seed)])
    else:
        for _, layer in quantized_layers(model):
            layer.act_range[...] = jnp.asarray([-2.5, 3.5], jnp.float32)
            layer.act_granularity = "static"
    _nudge(model)
    return model, config


def _initializers(path):
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_family_round_trips_through_onnxruntime(family, tmp_path):
    model, config = _student(family)
    held_out = _inputs(family, config, 3, seed=7)
    path = tmp_path / f"{family}.onnx"
    if family == "flux":  # the command line's path: a training-style (x_t, t, cond) batch, 2x2 packed
        x_t = np.random.default_rng(7).standard_normal((3, 1, 8, 8)).astype(np.float32)
        cond = {k: held_out[k] for k in ("encoder_hidden_states", "pooled_projections", "guidance")}
        report = export_onnx_run(model, "flux", (x_t, held_out["timestep"], cond), str(path), check=False)
        held_out = jax.tree.map(np.asarray, model_kwargs("flux", x_t, held_out["timestep"], cond))
    else:
        report = export_onnx(model, held_out, str(path), check=False)  # compared below

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 21
    graph = proto.graph
    names = {f"{k}.{sub}" if isinstance(v, dict) else k: None for k, v in held_out.items()
             for sub in (v if isinstance(v, dict) else [None])}
    assert sorted(i.name for i in graph.input) == sorted(names)
    assert [o.name for o in graph.output] == ["sample"]
    for value in graph.input:
        first = value.type.tensor_type.shape.dim[0]
        assert (first.dim_param == "batch") == (value.name not in ("img_ids", "txt_ids")), value.name

    # Numerics: onnxruntime against the frozen JAX model on held-out inputs; batch 1 runs too.
    frozen = fraqat_jax.freeze(model)
    ref = frozen_output(frozen, held_out)
    got = run_onnx(str(path), held_out)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= TOLERANCE
    first = {k: (v if k in ("img_ids", "txt_ids") else jax.tree.map(lambda a: a[:1], v)) for k, v in held_out.items()}
    np.testing.assert_allclose(run_onnx(str(path), first), got[:1], rtol=1e-5, atol=1e-5 * np.abs(got).max())

    # One INT4 initializer per quantized layer, holding freeze's packed codes byte for byte.
    layers = frozen_layers(frozen)
    n_quantized = len([1 for _, layer in quantized_layers(model) if layer.bits is not None])
    assert report["quantized_layers"] == report["weight_initializers"] == n_quantized == len(layers)
    int4 = {t.name: t for t in graph.initializer if t.data_type == TensorProto.INT4 and "kernel_codes" in t.name}
    assert len(int4) == n_quantized
    # Every weight DequantizeLinear names its zero point (0, of the codes' type and the scales' shape).
    inits = _initializers(path)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int4:
            assert len(node.input) == 3
            zero, scale = inits[node.input[2]], inits[node.input[1]]
            assert zero.data_type == TensorProto.INT4 and list(zero.dims) == list(scale.dims)
            assert not any(zero.raw_data)
    for layer_path, layer in layers.items():
        (tensor,) = [t for name, t in int4.items() if name.startswith(layer_path + ".kernel_codes")]
        assert list(tensor.dims) == list(layer.kernel_shape)
        assert tensor.raw_data == np.asarray(layer.kernel_codes[...]).tobytes()
    # Each QuantizeLinear has a scalar float scale and a uint8 zero point.
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize
    for node in quantize:
        assert inits[node.input[2]].data_type == TensorProto.UINT8
    # 4-bit codes are 1/4 of bf16; the float32 scale per output channel adds 2 / in_features.
    assert report["weight_bytes"] < 0.45 * report["weight_bytes_bf16"]
    print(f"{family}: max|onnx - frozen| / max|frozen| = {err:.2e}; quantized weights "
          f"{report['weight_bytes']} B vs {report['weight_bytes_bf16']} B in bf16 "
          f"({report['weight_bytes'] / report['weight_bytes_bf16']:.3f})")


class _Shared(nnx.Module):
    """One linear layer called twice, and reachable by two paths."""

    def __init__(self, *, rngs):
        self.proj = nnx.Linear(8, 8, rngs=rngs)
        self.blocks = nnx.List([self.proj])
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, hidden_states):
        h = jax.nn.gelu(self.proj(hidden_states))
        return self.out(jax.nn.silu(self.blocks[0](h)) + h)


def test_shared_layer_gets_one_initializer_and_group_scales(tmp_path):
    model = _Shared(rngs=nnx.Rngs(0))
    rules = [fraqat_jax.Rule(r"proj|blocks\.0", weight_bits=4, act_bits=8, channel_axis=-1, group_size=4),
             fraqat_jax.Rule("out", weight_bits=6, act_bits=8)]
    fraqat_jax.quantize_model(model, rules)
    rng = np.random.default_rng(0)
    # Trained dynamic (per token): the ranges are calibrated for static runtimes, the model stays dynamic.
    fraqat_jax.calibrate(model, [rng.standard_normal((4, 5, 8)).astype(np.float32)], switch_to_static=False)
    assert {layer.act_granularity for _, layer in quantized_layers(model)} == {"token"}
    _nudge(model)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    path = tmp_path / "shared.onnx"
    report = export_onnx(model, {"hidden_states": x}, str(path))
    assert report["quantized_layers"] == report["weight_initializers"] == 2
    assert report["max_rel_diff"] <= TOLERANCE
    assert f"{report['max_rel_diff']:.2e}" in summary(report) and "within 0.01" in summary(report)
    graph = onnx.load(str(path)).graph
    codes = [t for t in graph.initializer if "kernel_codes" in t.name]
    assert sorted(t.data_type for t in codes) == sorted([TensorProto.INT4, TensorProto.INT8])
    blocked = [n for n in graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 4 for a in n.attribute)]
    assert len(blocked) == 1  # the shared layer's weights are dequantized once
    scale = numpy_helper.to_array(_initializers(path)[blocked[0].input[1]])
    assert scale.shape == (2, 8)  # (in / group, out)
    ref = np.asarray(fraqat_jax.freeze(static_view(model))(jnp.asarray(x)))
    got = run_onnx(str(path), {"hidden_states": x})
    assert np.abs(got - ref).max() <= TOLERANCE * np.abs(ref).max()
    # The traced graph's weight map: each layer's one weight DequantizeLinear, named by the layer's path.
    traced = to_onnx(model, {"hidden_states": x})
    dequantized = {n.output[0]: n.input[0] for n in traced.proto.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(traced.weight_outputs.values()) == ["blocks.0", "out"]  # the shared layer once (its first path)
    for output, layer_path in traced.weight_outputs.items():
        assert dequantized[output].startswith(layer_path + ".kernel_codes")
    assert traced.counts["quantized_layers"] == 2


def test_unsupported_settings_name_the_layer(tmp_path):
    dynamic = fraqat_jax.quantize_model(_Shared(rngs=nnx.Rngs(0)))  # per-token dynamic inputs
    x = {"hidden_states": np.zeros((2, 5, 8), np.float32)}
    with pytest.raises(OnnxExportError, match=r"layer '\w+(\.0)?' quantizes its input dynamically \(act_granularity='token'\) and has no calibrated range"):
        export_onnx(dynamic, x, str(tmp_path / "a.onnx"))
    asym = fraqat_jax.quantize_model(_Shared(rngs=nnx.Rngs(0)), [fraqat_jax.Rule(".*", act_bits=None, symmetric=False)])
    with pytest.raises(OnnxExportError, match=r"layer '(proj|blocks\.0)' has asymmetric weights"):
        export_onnx(asym, x, str(tmp_path / "b.onnx"))


def test_command_line_exits_1_above_the_stated_tolerance(tmp_path, capsys, monkeypatch):
    """As the orbax export refuses to write above its tolerance, ``--format onnx`` exits 1 when
    onnxruntime disagrees with the frozen JAX model beyond ``TOLERANCE`` (here set to 0)."""
    from eval_shared import trained_run

    from fraqat_jax import export
    from fraqat_jax.export import onnx as export_onnx_module

    monkeypatch.setattr(export_onnx_module, "TOLERANCE", 0.0)
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", trained_run(), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"])
    assert e.value.code == 1 and "above the export's tolerance 0" in capsys.readouterr().err
