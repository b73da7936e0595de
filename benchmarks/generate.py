"""Text generation cost: our key-value-cache decoder against the old recompute loop and transformers.

Models: ``builtin:lm`` (the shipped tiny Gemma-2, 256 positions) and ``random``, a random Gemma-2
of about 100 M parameters with a 32k vocabulary (hidden 768, 8 layers, MLP 3072, 12 heads of 64,
4 key-value heads, sliding window 4096), saved as one transformers folder that both sides load.

Rows, all greedy, at each batch size (``--batches``) and prompt length (``--prompts``), with
``--new`` new tokens and no end token (every row decodes all of them):

- ``ours_float``: ``models.sampler``'s prefill + decode loop on the float32 teacher;
- ``ours_w4a8``: the same on the frozen W4A8 student (``fraqat_jax.freeze`` of the paper's rule,
  every Linear at 4-bit weights, 8-bit per-token inputs; integer matmuls);
- ``ours_w4a8_packed`` (not run unless named in ``--rows``): that student frozen with
  ``unpack=False``, its codes only packed two per byte, as on an accelerator (the CPU default also
  holds them unpacked, one ``int8`` each, which the CPU forms widen faster);
- ``ours_w4a8_fused`` (not run unless named in ``--rows``): that student with every layer's
  ``matmul`` set to ``"fused"`` (``fraqat_jax.nn.freeze``), the CPU form that XLA splits between
  threads at one token, where ``"auto"``'s blocked form runs on one core;
- ``recompute``: the decoder this replaced (the whole ``[B, P + new]`` buffer through the model at
  every token, in one ``fori_loop``); its cost per token is the same at every step, so
  ``--recompute-steps`` steps are timed and the per-token time scaled to ``--new``;
- ``hf_dynamic`` / ``hf_static``: transformers' ``generate`` (torch, CPU, eager attention) with
  its dynamic and its static cache, ``torch.set_num_threads`` = the cores.

Before any timing, our float tokens must equal transformers' (the frozen student's are its own).
Timings are interleaved (one repetition of every row, then the next) and reported as medians of
``--reps``: compile seconds (first call minus a warm one, ours only), prefill seconds (the prompt
through the model, first token's logits; transformers: ``generate`` with one new token) and decode
tokens/s (``batch * (new - 1)`` over the rest).

    python benchmarks/generate.py --model builtin --prompts 16 96 --batches 1 8
    python benchmarks/generate.py --model random --prompts 16 512 --batches 1 8 --reps 5
    python benchmarks/generate.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import Rule, freeze, quantize_model
from fraqat_jax.models import from_transformers
from fraqat_jax.text import builtin_teacher_dir
from fraqat_jax.models.sampler import Sampler
from fraqat_jax.nn.freeze import FrozenLinear

RANDOM_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=8,
                   num_attention_heads=12, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
                   sliding_window=4096, max_position_embeddings=8192, pad_token_id=0, eos_token_id=1,
                   bos_token_id=2)
SMOKE = dict(RANDOM_100M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
             max_position_embeddings=256)


def random_folder(config: dict, seed: int = 0) -> str:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**config))
    folder = tempfile.mkdtemp(prefix="fraqat_bench_gemma2_")
    model.save_pretrained(folder)
    return folder


def recompute_tokens(model, buf, prompt_len: int):
    """The decoder this one replaced: the whole buffer through the model at every step, argmax of
    the prediction at ``t - 1`` written at ``t``."""

    def body(t, buf):
        logits = jax.lax.dynamic_index_in_dim(model(buf), t - 1, axis=1, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(buf, jnp.argmax(logits, -1).astype(jnp.int32), t, axis=1)

    return jax.lax.fori_loop(prompt_len, buf.shape[1], body, buf)


class Ours:
    """Prefill and decode timed apart (each its own compiled program)."""

    def __init__(self, model, batch: int, prompt: int, new: int):
        self.sampler = Sampler(model, eos_ids=(), length_multiple=1, batch_size=batch)
        self.model, self.batch, self.prompt, self.new = model, batch, prompt, new
        rng = np.random.default_rng(0)
        self.ids = jnp.asarray(rng.integers(3, model.config["vocab_size"], (batch, prompt)), jnp.int32)
        self.mask = jnp.ones_like(self.ids)

    def run(self):
        s = self.sampler
        t0 = time.perf_counter()
        cache = self.model.init_cache(self.batch, self.prompt + self.new)
        logits, cache = s._prefill(s.state, self.ids, self.mask, cache)
        logits.block_until_ready()
        t1 = time.perf_counter()
        options = {"temperature": jnp.float32(1.0), "top_k": jnp.int32(0), "top_p": jnp.float32(1.0)}
        out = s._decode(s.state, logits, cache, jax.random.key(0), jnp.zeros((self.batch,), bool), jnp.int32(0),
                        options, steps=self.new, sample=False, keep_logits=False)
        tokens = np.asarray(out["tokens"])
        t2 = time.perf_counter()
        return tokens, t1 - t0, t2 - t1


def _hf_run(ref, ids, new, cache):
    import torch

    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        t0 = time.perf_counter()
        ref.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = ref.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    return out[:, ids.shape[1]:].numpy(), t1 - t0, (t2 - t1) - (t1 - t0)


def bench(folder: str, batch: int, prompt: int, new: int, reps: int, recompute_steps: int, rows: set) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    teacher = from_transformers(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    ours = {"ours_float": Ours(teacher, batch, prompt, new)}
    if rows & {"ours_w4a8", "ours_w4a8_packed", "ours_w4a8_fused"}:  # one student, frozen each way named
        student = quantize_model(nnx.clone(teacher), [Rule(r".*", weight_bits=4.0, act_bits=8.0,
                                                            layer_types=("Linear",))])
    if "ours_w4a8" in rows:
        ours["ours_w4a8"] = Ours(freeze(student), batch, prompt, new)
    if "ours_w4a8_packed" in rows:  # without the CPU layout's unpacked codes
        ours["ours_w4a8_packed"] = Ours(freeze(student, unpack=False), batch, prompt, new)
    if "ours_w4a8_fused" in rows:  # the fused form at every token count
        frozen = freeze(student)
        for _, node in nnx.iter_graph(frozen):
            if isinstance(node, FrozenLinear):
                node.matmul = "fused"
        ours["ours_w4a8_fused"] = Ours(frozen, batch, prompt, new)
    ids_t = torch.tensor(np.asarray(ours["ours_float"].ids), dtype=torch.long)
    out: dict = {"batch": batch, "prompt": prompt, "new": new}
    compile_s = {}
    for name, o in ours.items():  # first call (compiles) and a warm one
        _, p0, d0 = o.run()
        _, p1, d1 = o.run()
        compile_s[name] = (p0 - p1) + (d0 - d1)
    if "ours_w4a8" in ours and "ours_w4a8_fused" in ours:
        # Both forms give the same integer sums (tests/nn/test_nn_freeze.py, bit for bit); greedy tokens
        # still parted at prompt 512 (presumably the float epilogue, which XLA compiles apart per form).
        a, b = (np.asarray(ours[k].run()[0]) for k in ("ours_w4a8", "ours_w4a8_fused"))
        if not np.array_equal(a, b):
            first = int(np.argmax(np.any(a != b, axis=0)))
            print(f"note: the blocked and fused W4A8 forms' greedy tokens part at new token {first} of {a.shape[-1]} "
                  f"(batch {batch}, prompt {prompt})", flush=True)
    if "ours_w4a8" in ours and "ours_w4a8_packed" in ours:  # the same sums and epilogue: the same tokens
        a, b = (np.asarray(ours[k].run()[0]) for k in ("ours_w4a8", "ours_w4a8_packed"))
        if not np.array_equal(a, b):
            raise SystemExit(f"the unpacked and packed W4A8 layouts' greedy tokens differ (batch {batch}, "
                             f"prompt {prompt})")
    tokens, _, _ = ours["ours_float"].run()
    want, _, _ = _hf_run(ref, ids_t, new, "dynamic")
    if not np.array_equal(tokens, want):
        raise SystemExit(f"greedy tokens differ from transformers' at batch {batch}, prompt {prompt}")
    recompute = None
    if "recompute" in rows:
        steps = min(recompute_steps, new)
        graphdef, state = nnx.split(teacher)
        fn = jax.jit(lambda st, b, p: recompute_tokens(nnx.merge(graphdef, st), b, p), static_argnums=2)
        buf = jnp.zeros((batch, prompt + new), jnp.int32).at[:, :prompt].set(ours["ours_float"].ids)
        start = prompt + new - steps  # the last `steps` positions of the same fixed buffer
        fn(state, buf, start).block_until_ready()
        recompute = lambda: fn(state, buf, start).block_until_ready()  # noqa: E731
    times: dict = {k: [] for k in ("ours_float", "ours_w4a8", "ours_w4a8_packed", "ours_w4a8_fused", "recompute",
                                   "hf_dynamic", "hf_static") if k in rows}
    for _ in range(reps):  # interleaved
        for name, o in ours.items():
            _, p, d = o.run()
            times[name].append((p, d))
        if recompute is not None:
            t0 = time.perf_counter()
            recompute()
            times["recompute"].append((None, (time.perf_counter() - t0) / steps * new))
        for cache in ("dynamic", "static"):
            if f"hf_{cache}" in rows:
                _, p, d = _hf_run(ref, ids_t, new, cache)
                times[f"hf_{cache}"].append((p, d))
    for name, ts in times.items():
        prefill = [p for p, _ in ts if p is not None]
        decode = statistics.median(d for _, d in ts)
        per_token_steps = new - 1 if name.startswith("hf_") else new
        out[name] = {"compile_s": compile_s.get(name), "prefill_s": statistics.median(prefill) if prefill else None,
                     "decode_tok_s": batch * per_token_steps / decode, "decode_s": decode}
    for name in ("ours_w4a8", "ours_w4a8_packed", "ours_w4a8_fused"):
        if name in out:
            out[f"{name}_vs_float"] = out[name]["decode_tok_s"] / out["ours_float"]["decode_tok_s"]
    if "recompute" in out:
        out["cache_speedup_vs_recompute"] = out["recompute"]["decode_s"] / out["ours_float"]["decode_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("builtin", "random"), default="builtin")
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 96])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--recompute-steps", type=int, default=8)
    p.add_argument("--rows", nargs="+", default=["ours_float", "ours_w4a8", "recompute", "hf_dynamic", "hf_static"])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, seconds on a CPU")
    args = p.parse_args(argv)
    if args.smoke:
        folder, args.prompts, args.batches, args.new, args.reps = random_folder(SMOKE), [8], [2], 8, 1
    else:
        folder = builtin_teacher_dir() if args.model == "builtin" else random_folder(RANDOM_100M)
    results = []
    for batch in args.batches:
        for prompt in args.prompts:
            r = bench(folder, batch, prompt, args.new, args.reps, args.recompute_steps, set(args.rows))
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "smoke" if args.smoke else args.model, "cores": os.cpu_count(),
                       "device": jax.devices()[0].device_kind, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
