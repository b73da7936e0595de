"""The text runner: a prompt to a continuation with the prefill and decode graphs of a generation
folder (``export --format qnn`` on a language-model run), numpy + onnxruntime + tokenizers only.

``python -m fraqat_jax.deploy DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--seed S] [--provider qnn|cpu] [--out FILE]``

The order of calls, as an app would port it:

1. tokenize the prompt (``tokenizer.json``; its post-processor adds ``<bos>``);
2. prefill: the prompt in chunks of ``prefill_len`` tokens through the prefill graph, each chunk at
   the next positions (the last chunk ends at the prompt's end, so it may recompute a few cached
   positions; padding after the prompt's end is seen by no real token); after each chunk the
   keys and values it returns are written into the host cache at their positions;
3. decode: one token at a time through the decode graph, the cache slots ``0 .. C-2`` as its past;
4. after each step, the next token: argmax of the logits (greedy, ``--temperature 0``, the
   default) or a draw from ``softmax(logits / T)`` cut to the ``--top-k`` largest and the smallest
   set holding ``--top-p`` of the mass (``numpy.random.default_rng(seed)``);
5. stop at an end token (``generation_config.json``'s ``eos_token_id`` and ``<end_of_turn>``), after
   ``--max-new-tokens`` tokens, or when the context is full.

Host cache: per layer ``keys [Hkv, head_dim, C]`` and ``values [Hkv, C, head_dim]``, slot ``s``
holding position ``s``. Each step's inputs are the first ``C - N`` slots, the additive masks
(:func:`step_tables`: causal, the slots before the step's first position valid, the sliding
window on ``sliding_attention_mask``) and the rotary tables of the new positions.

``--out FILE`` writes one JSON line ``{"prompt", "text", "tokens"}`` (``text``: the continuation
decoded with special tokens skipped; ``tokens``: how many new tokens, the end token excluded).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable, Mapping

import numpy as np

from fraqat_jax.deploy.common import DeployError, make_session

__all__ = ["MASKED", "TextModel", "add_arguments", "generate", "next_token", "rotary", "run", "session_fn", "step_tables"]

#: The additive mask's value for a hidden key: finite in fp16 (HTP) and far below any soft-capped score.
MASKED = -1e4
END_OF_TURN = "<end_of_turn>"


# ----------------------------------------------------------------------------- the step's host inputs


def rotary(positions: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos``, ``sin`` ``[1, N, dim]`` float32 of integer ``positions [N]``: frequencies ``theta **
    (-2i / dim)``, each repeated over the two halves."""
    inv = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    f = np.asarray(positions, np.float32)[:, None] * inv
    emb = np.concatenate([f, f], axis=-1)[None]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def step_tables(start: int, n: int, context: int, *, valid: int | None = None, window: int | None = None,
                dim: int, theta: float) -> dict[str, np.ndarray]:
    """Masks ``[1, 1, n, context]`` and rotary tables ``[1, n, dim]`` of a step whose ``n`` new
    tokens sit at positions ``start .. start+n-1``; cache slot ``s`` holds position ``s`` (slots
    ``< start`` valid). ``valid``: how many of the new tokens are real (the rest is padding, which
    no real token sees). ``window``: the sliding window (``sliding_attention_mask``) or None."""
    past = context - n
    if start > past:
        raise ValueError(f"a step at position {start} with {n} tokens needs {start} cache slots; the graph has {past}")
    valid = n if valid is None else valid
    q_pos = start + np.arange(n)
    k_pos = np.concatenate([np.arange(past), start + np.arange(n)])
    k_ok = np.concatenate([np.arange(past) < start, np.arange(n) < valid])
    allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    out = {"attention_mask": np.where(allowed, 0.0, MASKED).astype(np.float32)[None, None]}
    if window is not None:
        near = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        out["sliding_attention_mask"] = np.where(near, 0.0, MASKED).astype(np.float32)[None, None]
    out["position_cos"], out["position_sin"] = rotary(q_pos, dim, theta)
    return out


# ----------------------------------------------------------------------------- the model with its cache


class TextModel:
    """The two graphs and the host cache. ``prefill_fn`` / ``decode_fn``: feeds -> outputs by name
    (onnxruntime sessions wrapped, or anything that computes the step); ``geometry``: the manifest's
    ``model`` entry (``layers``, ``kv_heads``, ``head_dim``, ``rope_theta``, ``sliding_window``,
    ``context_len``, ``prefill_len``). ``record``: ``{"prefill": [], "decode": []}`` lists that
    receive every step's feeds (calibration)."""

    def __init__(self, geometry: Mapping, prefill_fn: Callable, decode_fn: Callable, record: dict | None = None):
        g = geometry
        self.layers, self.kv_heads, self.head_dim = int(g["layers"]), int(g["kv_heads"]), int(g["head_dim"])
        self.theta, self.window = float(g["rope_theta"]), g.get("sliding_window")
        self.context, self.chunk = int(g["context_len"]), int(g["prefill_len"])
        self.fns = {"prefill": prefill_fn, "decode": decode_fn}
        self.record = record
        self.reset()

    def reset(self) -> None:
        c, h, d = self.context, self.kv_heads, self.head_dim
        self.keys = np.zeros((self.layers, 1, h, d, c), np.float32)
        self.values = np.zeros((self.layers, 1, h, c, d), np.float32)
        self.length = 0  # positions cached

    def _step(self, kind: str, ids: np.ndarray, start: int, valid: int) -> np.ndarray:
        n = ids.shape[0]
        past = self.context - n
        feeds = {"input_ids": ids.astype(np.int32)[None],
                 **step_tables(start, n, self.context, valid=valid, window=self.window, dim=self.head_dim,
                               theta=self.theta)}
        for i in range(self.layers):
            feeds[f"past_key_{i}_in"] = self.keys[i, :, :, :, :past]
            feeds[f"past_value_{i}_in"] = self.values[i, :, :, :past]
        if self.record is not None:
            self.record[kind].append({k: np.array(v) for k, v in feeds.items()})
        out = self.fns[kind](feeds)
        for i in range(self.layers):
            self.keys[i, :, :, :, start:start + valid] = out[f"past_key_{i}_out"][..., :valid]
            self.values[i, :, :, start:start + valid] = out[f"past_value_{i}_out"][:, :, :valid]
        self.length = start + valid
        return out["logits"][0, :valid]

    def prefill(self, ids) -> np.ndarray:
        """Runs the prompt ``ids`` from position 0 in chunks; returns the logits ``[len(ids), vocab]``."""
        ids = np.asarray(ids, np.int32)
        p, n = len(ids), self.chunk
        if not 0 < p <= self.context:
            raise ValueError(f"a prompt of {p} tokens does not fit the context of {self.context}")
        self.reset()
        logits, start = [], 0
        while start < p:
            begin = min(start, max(p - n, 0))  # the last chunk ends at the prompt's end
            part = ids[begin:begin + n]
            valid = len(part)
            padded = np.zeros((n,), np.int32)
            padded[:valid] = part
            out = self._step("prefill", padded, begin, valid)
            logits.append(out[start - begin:])
            start = begin + valid
        return np.concatenate(logits)

    def decode(self, token: int) -> np.ndarray:
        """Feeds ``token`` at the next position; returns its logits ``[vocab]``."""
        if self.length >= self.context:
            raise ValueError(f"the context of {self.context} positions is full")
        return self._step("decode", np.asarray([token], np.int32), self.length, 1)[0]


def next_token(logits: np.ndarray, rng, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> int:
    """Argmax when ``temperature <= 0``, else a draw from the tempered softmax cut to the ``top_k``
    largest (0: no cut) and to the smallest set holding ``top_p`` of the mass."""
    logits = np.asarray(logits, np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def generate(model: TextModel, prompt_ids, *, max_new_tokens: int, eos_ids=(), temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, keep_logits: bool = False) -> dict:
    """``{"tokens": new ids (end token excluded), "logits": per step (with keep_logits), "seconds":
    {"prefill", "decode"}, "decode_steps"}``; at most ``context - len(prompt)`` new tokens."""
    rng = np.random.default_rng(seed)
    eos = {int(e) for e in eos_ids}
    start = time.perf_counter()
    logits = model.prefill(prompt_ids)[-1]
    prefill_s = time.perf_counter() - start
    new = min(int(max_new_tokens), model.context - len(prompt_ids))
    tokens, kept, steps = [], [], 0
    start = time.perf_counter()
    for i in range(new):
        if keep_logits:
            kept.append(np.array(logits))
        token = next_token(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        if token in eos:
            break
        tokens.append(token)
        if i + 1 < new:
            logits = model.decode(token)
            steps += 1
    out = {"tokens": tokens, "seconds": {"prefill": prefill_s, "decode": time.perf_counter() - start},
           "decode_steps": steps}
    if keep_logits:
        out["logits"] = np.stack(kept) if kept else np.zeros((0,), np.float32)
    return out


# ----------------------------------------------------------------------------- folder and command line


def session_fn(session) -> Callable:
    """``feeds -> {output name: array}`` for an onnxruntime session, reading only the feeds the
    session declares as inputs (a step's feeds hold every graph's inputs)."""
    names = [o.name for o in session.get_outputs()]
    wanted = [i.name for i in session.get_inputs()]
    return lambda feeds: dict(zip(names, session.run(names, {k: feeds[k] for k in wanted})))


def simulator() -> bool:
    """True on an x86-64 host, where the QNN HTP backend is Qualcomm's simulator: it cannot load a
    weight-shared context binary, so the runner compiles the ONNX graphs on HTP there."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def open_graphs(manifest: Mapping, folder: str, provider: str) -> tuple[Callable, Callable]:
    """``(prefill_fn, decode_fn)`` on ``provider``: on the CPU the CPU graphs (``cpu_onnx``: the HTP
    graphs with each quantized product computed as the frozen JAX student computes it; the HTP
    graphs where a folder has none);
    on ``qnn`` the shared EPContext models (``ep.share_ep_contexts``) on a device, the ONNX graphs
    compiled on HTP (CPU fallback disabled) on the simulator."""
    comps = manifest.get("components") or {}
    paths = {}
    for name in ("prefill", "decode"):
        if name not in comps:
            raise DeployError(f"{folder!r} is not a generation folder: pipeline.json names no {name!r} graph")
        use_ctx = provider == "qnn" and not simulator()
        key = "context" if use_ctx else ("cpu_onnx" if provider == "cpu" and comps[name].get("cpu_onnx") else "onnx")
        rel = comps[name].get(key)
        path = os.path.join(folder, rel or "")
        if not rel or not os.path.isfile(path):
            raise DeployError(f"the {name} graph of {folder!r} is missing: {path!r}")
        paths[name] = path
    if provider == "qnn" and not simulator():
        return tuple(session_fn(_shared_context_session(paths[n], manifest.get("soc"), last=n == "decode"))
                     for n in ("prefill", "decode"))
    return tuple(session_fn(make_session(paths[n], provider, manifest.get("soc"))) for n in ("prefill", "decode"))


def _shared_context_session(path: str, soc, *, last: bool):
    import onnxruntime as ort

    from fraqat_jax.deploy.common import htp_options

    options = htp_options(soc)
    options.add_session_config_entry("ep.share_ep_contexts", "1")
    if last:
        options.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    return ort.InferenceSession(path, options)


def load_tokenizer(folder: str):
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise DeployError(f"{folder!r} is not a generation folder: it has no tokenizer.json")
    return Tokenizer.from_file(path)


def end_tokens(folder: str, manifest: Mapping, tokenizer) -> list[int]:
    """``generation_config.json``'s ``eos_token_id`` (an id or a list; else the manifest's) and
    ``<end_of_turn>`` when the vocabulary has it."""
    ids = manifest.get("eos_token_id")
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            ids = json.load(f).get("eos_token_id", ids)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    turn = tokenizer.token_to_id(END_OF_TURN)
    return sorted({int(i) for i in ids} | ({int(turn)} if turn is not None else set()))


def add_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample within this share of the mass (default 1)")


def _check(manifest: Mapping, folder: str, args) -> None:
    if manifest.get("kind") != "text" or "model" not in manifest:
        raise DeployError(f"{folder!r} is not a generation folder (pipeline.json kind {manifest.get('kind')!r})")
    if args.prompt is None or args.prompt == "":
        raise DeployError("--prompt is required and must not be empty")
    if args.max_new_tokens < 1:
        raise DeployError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise DeployError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise DeployError(f"--top-k must be >= 0 (0: no cut), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise DeployError(f"--top-p must be in (0, 1], got {args.top_p}")


def run(manifest: Mapping, folder: str, args) -> dict:
    """The command line's text kind (see the module docstring)."""
    _check(manifest, folder, args)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(args.prompt).ids
    context = int(manifest["model"]["context_len"])
    if len(ids) >= context:
        raise DeployError(f"the prompt has {len(ids)} tokens, longer than the context allows: at most {context - 1} "
                          f"(context length {context}) leaving room for one new token")
    start = time.perf_counter()
    prefill_fn, decode_fn = open_graphs(manifest, folder, args.provider)
    load_s = time.perf_counter() - start
    model = TextModel(manifest["model"], prefill_fn, decode_fn)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, eos_ids=end_tokens(folder, manifest, tokenizer),
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    text = tokenizer.decode(out["tokens"], skip_special_tokens=True)
    print(text)
    pre, dec = out["seconds"]["prefill"], out["seconds"]["decode"]
    print(f"graphs loaded in {load_s:.2f} s ({args.provider}); prefill: {len(ids)} tokens in {pre:.3f} s "
          f"({len(ids) / max(pre, 1e-9):.1f} tokens/s); decode: {len(out['tokens'])} tokens in {dec:.3f} s "
          f"({out['decode_steps'] / max(dec, 1e-9):.1f} tokens/s)", file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps({"prompt": args.prompt, "text": text, "tokens": len(out["tokens"])}) + "\n")
    return {"prompt": args.prompt, "text": text, "tokens": out["tokens"], "seconds": out["seconds"]}
