"""Pretrains the built-in language-model teacher: a tiny Gemma-2 on CPython's standard library.

``python -m fraqat_jax.pretrain.text [--corpus DIR] [--steps N] [--out DIR]`` writes a transformers
``Gemma2ForCausalLM`` folder (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``) plus the text that ships with it, to ``fraqat_jax/assets/tiny_gemma2``:

- the corpus: every ``.py`` file of 100 kB or less under the standard-library folder ``--corpus``
  (default: this Python's), outside ``site-packages``, the test suites, ``pydoc_data``,
  ``encodings``, ``lib2to3`` and ``ensurepip``, in sorted path order. Every 25th file (from the
  13th) is held out; the rest is the pretraining text;
- the tokenizer: byte-level BPE with :data:`VOCAB_SIZE` tokens trained on the pretraining text
  (``tokenizers``), special tokens ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 (Gemma's ids),
  ``<bos>`` prepended by its post-processor as Gemma's tokenizer does;
- the model: :data:`TEACHER_CONFIG` (every Gemma-2 feature: alternating sliding-window and global
  layers with a window shorter than the training windows, grouped-query attention, both soft caps,
  tied embeddings), trained with next-token cross-entropy on :data:`SEQ_LEN`-token windows packed
  by :mod:`fraqat_jax.data.text` (the windows the distillation uses), AdamW with warmup and cosine
  decay;
- ``train.jsonl``: pretraining files (every 6th, up to :data:`TRAIN_TEXT_BYTES`) for distillation
  runs (``configs/lm_default.py``); ``heldout.jsonl``: held-out files (up to
  :data:`HELDOUT_TEXT_BYTES`) that neither pretraining nor distillation saw, one ``{"path",
  "text"}`` line per file; ``pretraining.json``: the recipe and the held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from importlib.resources import files

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fraqat_jax.data.text import SpecialTokens, TextSource, pack_windows, tokenize_documents
from fraqat_jax.models.gemma2 import Gemma2ForCausalLM
from fraqat_jax.models.transformers_folder import save_transformers

__all__ = ["SEQ_LEN", "TEACHER_CONFIG", "VOCAB_SIZE", "corpus_files", "main", "pretrain", "train_tokenizer"]

VOCAB_SIZE = 2048
SEQ_LEN = 128
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as Gemma numbers pad, eos, bos, unk
TEACHER_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "max_position_embeddings": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "pydoc_data", "encodings", "lib2to3", "ensurepip",
             "__pycache__"}
MAX_FILE_BYTES = 100_000
HELDOUT_EVERY, HELDOUT_OFFSET = 25, 12
TRAIN_TEXT_EVERY, TRAIN_TEXT_BYTES, HELDOUT_TEXT_BYTES = 6, 800_000, 200_000
STEPS, BATCH_SIZE, LR, WARMUP = 1200, 16, 3e-3, 50


def default_out() -> str:
    return str(files("fraqat_jax").joinpath("assets", "tiny_gemma2"))


def corpus_files(stdlib: str) -> tuple[list[str], list[str]]:
    """``(pretraining, held_out)`` paths relative to ``stdlib`` (see the module docstring)."""
    found = []
    for folder, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        found += [os.path.relpath(os.path.join(folder, n), stdlib) for n in names
                  if n.endswith(".py") and os.path.getsize(os.path.join(folder, n)) <= MAX_FILE_BYTES]
    found.sort()
    held = set(found[HELDOUT_OFFSET::HELDOUT_EVERY])
    return [f for f in found if f not in held], [f for f in found if f in held]


def _read(stdlib: str, paths) -> list[str]:
    out = []
    for p in paths:
        with open(os.path.join(stdlib, p), encoding="utf-8") as f:
            out.append(f.read())
    return out


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE over ``texts`` with Gemma's special-token ids; ``encode`` prepends ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    return tok


def _write_jsonl(path: str, paths, texts, budget: int) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for p, t in zip(paths, texts):
            if written + len(t) > budget:
                continue
            f.write(json.dumps({"path": p, "text": t}) + "\n")
            written += len(t)
    return written


def pretrain(train_windows: np.ndarray, *, steps: int = STEPS, batch_size: int = BATCH_SIZE, lr: float = LR,
             seed: int = 0, log_every: int = 100) -> Gemma2ForCausalLM:
    """:data:`TEACHER_CONFIG` trained on ``train_windows`` ``[N, SEQ_LEN]`` with next-token cross-entropy."""
    model = Gemma2ForCausalLM(TEACHER_CONFIG, rngs=nnx.Rngs(seed))
    graph, params = nnx.split(model)
    warmup = min(WARMUP, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids):
        def loss_fn(p):
            logits = nnx.merge(graph, p)(ids[:, :-1]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    source = TextSource(train_windows, seed=seed)
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(source.batch(i, batch_size)["input_ids"]))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            print(f"step {i + 1}/{steps}  loss {float(loss):.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    return nnx.merge(graph, params)


def heldout_perplexity(model, windows: np.ndarray, batch_size: int = 16) -> float:
    """exp of the mean next-token cross-entropy over ``windows`` (every position after the first)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = jnp.asarray(windows[i:i + batch_size])
        logits = model(ids[:, :-1]).astype(jnp.float32)
        total += float(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).sum())
        count += ids[:, 1:].size
    return math.exp(total / count)


def save_teacher(model, tokenizer, out: str) -> None:
    """``model`` as a transformers folder (``models.save_transformers``) with ``tokenizer``."""
    save_transformers(model, out)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
                   "model_max_length": TEACHER_CONFIG["max_position_embeddings"]}, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fraqat_jax.pretrain.text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"],
                        help="a CPython standard-library folder (default: this Python's)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: the package's assets/tiny_gemma2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        print(f"error: --steps and --batch-size must be positive, got {args.steps}, {args.batch_size}", file=sys.stderr)
        return 2
    train_paths, held_paths = corpus_files(args.corpus)
    if not train_paths or not held_paths:
        print(f"error: --corpus {args.corpus!r} holds no standard-library .py files", file=sys.stderr)
        return 2
    out = args.out or default_out()
    t0 = time.perf_counter()
    train_texts, held_texts = _read(args.corpus, train_paths), _read(args.corpus, held_paths)
    tokenizer = train_tokenizer(train_texts)
    tokens = SpecialTokens.from_config(TEACHER_CONFIG)
    windows = pack_windows(tokenize_documents(tokenizer, train_texts), SEQ_LEN, tokens)
    print(f"{len(train_paths)} files ({sum(map(len, train_texts)) / 1e6:.1f} MB) -> {windows.size} tokens in "
          f"{len(windows)} windows; {len(held_paths)} held-out files; tokenizer in {time.perf_counter() - t0:.0f}s",
          flush=True)
    model = pretrain(windows, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    seconds = time.perf_counter() - t0
    save_teacher(model, tokenizer, out)
    sub = slice(None, None, TRAIN_TEXT_EVERY)
    train_chars = _write_jsonl(os.path.join(out, "train.jsonl"), train_paths[sub], train_texts[sub], TRAIN_TEXT_BYTES)
    held_chars = _write_jsonl(os.path.join(out, "heldout.jsonl"), held_paths, held_texts, HELDOUT_TEXT_BYTES)
    held_docs = [json.loads(line)["text"] for line in open(os.path.join(out, "heldout.jsonl"), encoding="utf-8")]
    held_windows = pack_windows(tokenize_documents(tokenizer, held_docs), SEQ_LEN, tokens)
    ppl = heldout_perplexity(model, held_windows)
    record = {"corpus": f"CPython {sys.version.split()[0]} standard library ({len(train_paths)} files pretraining, "
                        f"{len(held_paths)} held out)", "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": SEQ_LEN, "lr": args.lr, "seed": args.seed, "seconds": round(seconds),
              "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
              "train_text_chars": train_chars, "heldout_text_chars": held_chars,
              "heldout_windows": len(held_windows), "heldout_perplexity": round(ppl, 3)}
    with open(os.path.join(out, "pretraining.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
