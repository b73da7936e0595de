"""How often a generation folder's graphs give the JAX frozen student's greedy tokens.

    python benchmarks/text_agreement.py --workdir RUN --folder DIR [--prompts 120] [--tokens 32]
                                        [--graphs cpu,qnn_form] [--heldout FILE]

``RUN`` is a trained text run (``configs/lm_default.py``), ``DIR`` its ``export --format qnn``
folder. Prompts: the 11th, 21st, 31st ... line of at least 24 characters of each document of the
held-out file (default: the shipped LM data's ``heldout.jsonl``), the first ``--prompts`` of them.
For each prompt the reference is the frozen student's greedy continuation in JAX
(``qnn_text.jax_greedy``: its full forward over the growing sequence, as ``generate --model
frozen`` decodes). Each graph set runs on onnxruntime:

* ``cpu``: ``prefill_cpu.onnx`` / ``decode_cpu.onnx``, what ``deploy --provider cpu`` runs;
* ``qnn_form``: ``prefill.onnx`` / ``decode.onnx`` on the CPU, HTP's requantized products in float32;
* ``htp``: the runner's ``--provider qnn`` (on x86-64 the simulator: minutes per prompt).

Per set it prints one JSON line: prompts whose ``--tokens`` greedy tokens equal JAX's (the runner's
own loop) with a Wilson 95% interval, and, feeding JAX's tokens (teacher forcing), the steps whose
argmax differs from JAX's and the steps whose logits differ by more than 1e-5 x max|logits| (an
activation code moved somewhere upstream), with the median / 90th percentile / max of
max|logits - JAX| / max|logits| over the steps. No timing: agreement only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

GRAPH_SETS = ("cpu", "qnn_form", "htp")
MOVED = 1e-5  # x max|logits|: above float32 rounding of the same codes, below one code step


def held_out_prompts(path: str, count: int) -> list[str]:
    docs = [json.loads(line)["text"] for line in open(path, encoding="utf-8") if line.strip()]
    lines = [[line for line in d.splitlines() if len(line) >= 24] for d in docs]
    prompts = [ls[rank] for rank in range(10, 10_000, 10) for ls in lines if len(ls) > rank]
    return prompts[:count]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round((mid - half) / (1 + z * z / n), 4), round((mid + half) / (1 + z * z / n), 4)]


def text_model(folder: str, graphs: str):
    from fraqat_jax.deploy.text import TextModel, open_graphs, session_fn
    from fraqat_jax.export.qnn import cpu_session

    manifest = json.load(open(os.path.join(folder, "pipeline.json")))
    if graphs == "qnn_form":
        fns = [session_fn(cpu_session(os.path.join(folder, manifest["components"][k]["onnx"])))
               for k in ("prefill", "decode")]
    else:
        fns = open_graphs(manifest, folder, "cpu" if graphs == "cpu" else "qnn")
    return TextModel(manifest["model"], *fns)


def agreement(frozen, folder: str, prompt_ids, tokens: int, graphs: str, eos=()) -> dict:
    """The figures of the module docstring for one graph set over ``prompt_ids`` (token id lists)."""
    from fraqat_jax.deploy.text import generate
    from fraqat_jax.export.qnn_text import jax_greedy

    model = text_model(folder, graphs)
    context = model.context
    equal, flips, drift = 0, 0, []
    for ids in prompt_ids:
        ref_tokens, ref_logits = jax_greedy(frozen, ids, tokens, context, eos)
        equal += generate(model, ids, max_new_tokens=tokens, eos_ids=eos)["tokens"] == ref_tokens
        model.reset()
        rows = [model.prefill(ids)[-1]] + [model.decode(t) for t in ref_tokens[:len(ref_logits) - 1]]
        got = np.stack(rows)
        flips += int(np.sum(got.argmax(-1) != ref_logits.argmax(-1)))
        drift += (np.abs(got - ref_logits).max(-1) / np.abs(ref_logits).max(-1)).tolist()
    d = np.asarray(drift)
    n = len(prompt_ids)
    return {"graphs": graphs, "prompts": n, "tokens": tokens, "equal": int(equal), "wilson95": wilson(int(equal), n),
            "steps": int(d.size), "argmax_differs": flips, "steps_moved": int(np.sum(d > MOVED)),
            "drift_median": float(np.median(d)), "drift_p90": float(np.quantile(d, 0.9)), "drift_max": float(d.max())}


def main(argv=None) -> int:
    from importlib.resources import files

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--prompts", type=int, default=120)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--graphs", default="cpu,qnn_form")
    p.add_argument("--heldout", default=str(files("fraqat_jax").joinpath("assets", "tiny_gemma2", "heldout.jsonl")))
    args = p.parse_args(argv)
    sets = args.graphs.split(",")
    bad = [s for s in sets if s not in GRAPH_SETS]
    if bad or args.prompts < 1 or args.tokens < 1:
        print(f"--graphs takes {', '.join(GRAPH_SETS)} (got {args.graphs!r}); --prompts and --tokens at least 1",
              file=sys.stderr)
        return 2
    from fraqat_jax.deploy.text import end_tokens, load_tokenizer
    from fraqat_jax.generate import load_model

    frozen, _, _ = load_model(args.workdir, "frozen")
    tokenizer = load_tokenizer(args.folder)
    manifest = json.load(open(os.path.join(args.folder, "pipeline.json")))
    eos = end_tokens(args.folder, manifest, tokenizer)
    ids = [tokenizer.encode(text).ids for text in held_out_prompts(args.heldout, args.prompts)]
    for graphs in sets:
        print(json.dumps(agreement(frozen, args.folder, ids, args.tokens, graphs, eos)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
