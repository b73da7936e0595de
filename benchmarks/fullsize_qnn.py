"""Full-size QNN HTP builds with random weights (nothing can be downloaded here): the Gemma-2-2B
generation parts (prefill + decode graphs, context 4096, W4A8 blocks, the LM head at W8), the
Gemma-2-2B text encoder of Sana (300 tokens, W8A16, in parts) and the f32c32 DC-AE decoder at
512 x 512 (W8A16). One component (or one part) per process:

    python benchmarks/fullsize_qnn.py lm --part 0:4 --out OUT/lm/part_0          # layers 0..3
    python benchmarks/fullsize_qnn.py lm --head --out OUT/lm/head                # final norm + LM head
    python benchmarks/fullsize_qnn.py encoder --part 0:7 --out OUT/te/part_0      # --norm on the last part
    python benchmarks/fullsize_qnn.py decoder --out OUT/vae_decoder [--layers N]  # N blocks per stage
    python benchmarks/fullsize_qnn.py collect OUT/lm                              # parts -> OUT/lm/qnn.json

``--layers N`` (lm, encoder) builds layers ``0 .. N-1`` (a quick smoke build). Each build prints
one JSON line (and appends it to ``--log``): parameters, seconds to build the random model, to
export (trace, QNN form, files) and to compile the HTP context, the process's peak resident memory
(``ru_maxrss``), the context bytes against the INT4/INT8 codes and against bf16.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time

import numpy as np

GEMMA = "gemma-2-2b"
DCAE = "DC-AE-f32c32-Sana-1.0"
TEXT_LEN = 300
SOC = "sm8750"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _fill(state, seed: int, scale_base: float):
    """Random weights without running the initialisers: matrices ~ N(0, 1 / fan_in), norm scales
    (Gemma's ``1 + scale``, DC-AE's ``scale``) near their identity, other vectors near 0."""
    import jax

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if len(x.shape) >= 2:
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.standard_normal(x.shape, np.float32) / np.float32(np.sqrt(fan_in))).astype(x.dtype)
        base = scale_base if name == "scale" else 0.0
        return (base + 0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, state)


def _random(make, seed: int = 0, scale_base: float = 0.0):
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, _fill(state, seed, scale_base))


def _params(module) -> int:
    import jax
    from flax import nnx

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def gemma_config():
    from fraqat_jax.models.gemma2 import GEMMA2_DEFAULTS, GEMMA2_PRESETS

    return {**GEMMA2_DEFAULTS, **GEMMA2_PRESETS[GEMMA][1]}


def gemma_layers(config, start: int, stop: int, *, norm: bool, seed: int):
    """Random decoder layers ``start .. stop - 1`` of ``config`` (and the final norm), without the
    embedding table."""
    from flax import nnx

    from fraqat_jax.models.gemma2 import Gemma2ForCausalLM, layer_types

    kinds = layer_types(config)[start:stop]
    sub = dict(config, num_hidden_layers=max(stop - start, 1), vocab_size=8,
               layer_types=list(kinds) or ["full_attention"])
    model = _random(lambda: Gemma2ForCausalLM(sub, rngs=nnx.Rngs(0)), seed)
    return list(model.model.layers)[:stop - start], (model.model.norm if norm else None)


def _part_range(args, total: int) -> tuple[int, int]:
    if getattr(args, "head", False):
        return total, total
    if args.layers is not None:
        return 0, args.layers
    start, stop = (int(v) for v in args.part.split(":"))
    if not 0 <= start < stop <= total:
        raise SystemExit(f"--part must be START:STOP within 0..{total}, got {args.part}")
    return start, stop


def build_lm(args) -> dict:
    """A generation part: prefill (``--prefill-len``) and decode graphs at ``--context-len``."""
    from flax import nnx

    import fraqat_jax
    from fraqat_jax.deploy.text import step_tables
    from fraqat_jax.export import onnx as eo
    from fraqat_jax.export.qnn_parts import export_text_part
    from fraqat_jax.text.kv_step import geometry
    from fraqat_jax.text.parts import Gemma2KVPart

    t0 = time.perf_counter()
    config = gemma_config()
    geom = geometry(config)
    start, stop = _part_range(args, geom["layers"])
    layers, norm = gemma_layers(config, start, stop, norm=args.head, seed=start + 1)
    head = None
    if args.head:
        head = _random(lambda: nnx.Linear(config["hidden_size"], config["vocab_size"], use_bias=False,
                                          rngs=nnx.Rngs(0)), 99)
    part = Gemma2KVPart(config, layers, start, norm=norm, head=head)
    rules = [fraqat_jax.Rule(r"head", weight_bits=8, act_bits=None, channel_axis=-1),
             fraqat_jax.Rule(".*", weight_bits=4, act_bits=8, channel_axis=-1, layer_types=("Linear",))]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head rule matches nothing in a part without a head
        fraqat_jax.quantize_model(part, rules)
    c = args.context_len
    kinds = part.sliding

    def feeds(n: int, seed: int) -> dict:
        r = np.random.default_rng(seed)
        pos = c - n - 5  # a step near the end of the context
        tables = step_tables(pos, n, c, window=geom["sliding_window"], dim=geom["head_dim"], theta=geom["rope_theta"])
        out = {"hidden_states": r.standard_normal((1, n, config["hidden_size"])).astype(np.float32)}
        if layers:
            out.update(attention_mask=tables["attention_mask"], position_cos=tables["position_cos"],
                       position_sin=tables["position_sin"])
            if any(kinds):
                out["sliding_attention_mask"] = tables.get("sliding_attention_mask", tables["attention_mask"])
        for i in range(start, stop):
            out[f"past_key_{i}_in"] = r.standard_normal((1, geom["kv_heads"], geom["head_dim"], c - n)).astype(np.float32)
            out[f"past_value_{i}_in"] = r.standard_normal((1, geom["kv_heads"], c - n, geom["head_dim"])).astype(np.float32)
        return out

    n = args.prefill_len
    if any(layer.act_bits is not None for _, layer in _quantized(part)):
        fraqat_jax.calibrate(part, [feeds(n, 100)])
    part = eo.static_view(part)
    built = time.perf_counter() - t0
    report = export_text_part(part, args.out, {"prefill": feeds(n, 7), "decode": feeds(1, 8)},
                              {"prefill": [feeds(n, 200)], "decode": [feeds(1, 201)]}, soc=SOC,
                              product_bits=args.product_bits, passes=(_tanh_as_sigmoid(),), log=_log)
    return _result("lm", part, start, stop, built, report, args)


def build_encoder(args) -> dict:
    """A text-encoder part: ``TEXT_LEN`` tokens, W8A16 (weights after training, 16-bit activations)."""
    from fraqat_jax.export.qnn_pipeline import mask_wheres_as_adds, quantize_after_training
    from fraqat_jax.export.qnn_parts import export_text_part
    from fraqat_jax.text.parts import Gemma2EncoderPart, host_rotary

    t0 = time.perf_counter()
    config = gemma_config()
    start, stop = _part_range(args, config["num_hidden_layers"])
    layers, norm = gemma_layers(config, start, stop, norm=args.norm, seed=start + 1)
    part = quantize_after_training(Gemma2EncoderPart(config, layers, start, norm=norm), args.bits)
    cos, sin = host_rotary(np.arange(TEXT_LEN), config)

    def feeds(seed: int, tokens: int) -> dict:
        r = np.random.default_rng(seed)
        mask = (np.arange(TEXT_LEN) < tokens).astype(np.float32)[None]
        return {"hidden_states": r.standard_normal((1, TEXT_LEN, config["hidden_size"])).astype(np.float32),
                "attention_mask": mask, "position_cos": cos, "position_sin": sin}

    built = time.perf_counter() - t0
    cap = float(config["attn_logit_softcapping"])
    report = export_text_part(part, args.out, {"model": feeds(7, 40)}, {"model": [feeds(200, 60)]}, soc=SOC,
                              passes=(_tanh_as_sigmoid(), functools.partial(mask_wheres_as_adds, bias=4 * cap)),
                              log=_log)
    return _result("encoder", part, start, stop, built, report, args)


def build_decoder(args) -> dict:
    """The DC-AE decoder: raw latents ``[1, 32, 16, 16]`` -> images ``[1, 3, 512, 512]``, W8A16."""
    from flax import nnx

    from fraqat_jax.diffusion.phone import DecoderGraph
    from fraqat_jax.export.qnn_pipeline import quantize_after_training
    from fraqat_jax.export.qnn_parts import export_text_part
    from fraqat_jax.models.autoencoder_dc import DC_PRESETS, AutoencoderDC

    t0 = time.perf_counter()
    config = dict(DC_PRESETS[DCAE])
    if args.layers is not None:
        config["decoder_layers_per_block"] = tuple(min(args.layers, k) for k in config["decoder_layers_per_block"])
    vae = _random(lambda: AutoencoderDC(config, rngs=nnx.Rngs(0)), 3, scale_base=1.0)
    vae.encoder = None  # the decoder alone is exported
    graph = quantize_after_training(DecoderGraph(vae), args.bits)
    side = args.size // 32

    def feeds(seed):
        return {"latent": np.random.default_rng(seed).standard_normal((1, 32, side, side)).astype(np.float32)}

    built = time.perf_counter() - t0
    report = export_text_part(graph, args.out, {"model": feeds(7)}, {"model": [feeds(200)]}, soc=SOC, log=_log)
    return _result("decoder", graph, None, None, built, report, args)


def _quantized(module):
    from fraqat_jax.nn.graph import quantized_layers

    return quantized_layers(module)


def _tanh_as_sigmoid():
    from fraqat_jax.export.qnn_pipeline import tanh_as_sigmoid

    return tanh_as_sigmoid


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _result(component, module, start, stop, built, report, args) -> dict:
    params = _params(module)
    out = {"component": component, "layers": None if start is None else [start, stop], "head": bool(getattr(args, "head", False)),
           "norm": bool(getattr(args, "norm", False)), "parameters": params, "build_model_seconds": round(built, 1),
           "export_seconds": report["export_seconds"], "context_build_seconds": report["context_build_seconds"],
           "peak_gib": round(peak_gib(), 2), "context_bytes": report["context_bytes"],
           "weight_bytes": report["weight_bytes"], "weight_bytes_bf16": report["weight_bytes_bf16"],
           "bf16_bytes": 2 * params, "context_over_codes": round(report["context_bytes"] / max(report["weight_bytes"], 1), 3),
           "context_over_bf16": round(report["context_bytes"] / (2 * params), 3),
           "nodes": {k: g["nodes"] for k, g in report["graphs"].items()},
           "external_data": report["external_data"], "out": args.out}
    with open(os.path.join(args.out, "qnn.json")) as f:
        part = json.load(f)
    part["measured"] = out
    with open(os.path.join(args.out, "qnn.json"), "w") as f:
        json.dump(part, f, indent=2)
    return out


def collect(folder: str) -> dict:
    """``folder/qnn.json``: the parts (subfolders with a ``qnn.json``) in layer order, what each
    holds and its context, and the totals."""
    parts = []
    for sub in sorted(os.listdir(folder)):
        path = os.path.join(folder, sub, "qnn.json")
        if os.path.isfile(path):
            with open(path) as f:
                m = json.load(f)["measured"]
            parts.append({"folder": sub, "layers": m["layers"], "head": m["head"], "final_norm": m["norm"],
                          "context_files": json.load(open(path))["context_files"], "context_bytes": m["context_bytes"],
                          "weight_bytes": m["weight_bytes"], "parameters": m["parameters"]})
    parts.sort(key=lambda p: (p["layers"] or [1e9])[0] + (1e6 if p["head"] else 0))
    summary = {"parts": parts, "context_bytes": sum(p["context_bytes"] for p in parts),
               "weight_bytes": sum(p["weight_bytes"] for p in parts), "parameters": sum(p["parameters"] for p in parts)}
    with open(os.path.join(folder, "qnn.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lm", "encoder", "decoder"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--layers", type=int, default=None)
        p.add_argument("--log", default=None)
        if name != "decoder":
            p.add_argument("--part", default=None, help="START:STOP layers of the 26")
        if name == "lm":
            p.add_argument("--head", action="store_true", help="the final norm and the LM head (W8), no layers")
            p.add_argument("--prefill-len", type=int, default=128)
            p.add_argument("--context-len", type=int, default=4096)
            p.add_argument("--product-bits", type=int, default=16)
        else:
            p.add_argument("--bits", type=int, default=8)
        if name == "encoder":
            p.add_argument("--norm", action="store_true", help="the last part: the final norm after its layers")
        if name == "decoder":
            p.add_argument("--size", type=int, default=512)
    p = sub.add_parser("collect")
    p.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "collect":
        print(json.dumps(collect(args.folder)))
        return 0
    if args.command != "decoder" and args.layers is None and args.part is None and not getattr(args, "head", False):
        parser.error("give --part START:STOP, --layers N or --head")
    os.makedirs(args.out, exist_ok=True)
    result = {"lm": build_lm, "encoder": build_encoder, "decoder": build_decoder}[args.command](args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
