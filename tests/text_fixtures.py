"""A tiny random Gemma-2 transformers folder with a tiny BPE tokenizer, and small task files, for the
text evaluation, lm-eval adapter and transformers export tests (no download)."""

from __future__ import annotations

import json
import os

import numpy as np

CORPUS = [
    "The cat sat on the mat and looked at the bird.",
    "A dog ran in the park; the children laughed and played ball.",
    "Water boils at one hundred degrees when the air pressure is normal.",
    "Is the sky blue? Yes, on a clear day the sky is blue.",
    "Question: where do people keep milk?\nA. fridge\nB. shelf\nC. car\nD. bag\nE. desk\nAnswer: A",
    "Trains carry people between cities, and ships carry goods across the sea.",
    "She opened the window because the room was warm, then she read a book.",
    "Numbers like 3, 17 and 42 appear in stories about puzzles and games.",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as Gemma numbers them

TINY_GEMMA2 = dict(
    vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=8,
    query_pre_attn_scalar=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
)


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on :data:`CORPUS` that adds ``<bos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return tok


def write_tiny_gemma2(folder: str, *, seed: int = 0) -> str:
    """A transformers folder (config, random float32 weights, tokenizer) of a tiny Gemma-2."""
    import torch
    import transformers

    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer()
    cfg = dict(TINY_GEMMA2, vocab_size=tok.get_vocab_size())
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms start at zero in transformers: random ones so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def load_torch_model(folder: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()


def write_tasks(folder: str, *, n: int = 6, seed: int = 0) -> dict[str, str]:
    """Small ``mc``, ``boolq`` and ``commonsense_qa`` JSONL files (random golds); spec -> path."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    words = " ".join(CORPUS).replace("\n", " ").split()
    mc, boolq, csqa = [], [], []
    for i in range(n):
        ctx = " ".join(words[i * 3 : i * 3 + 5 + i % 3])
        choices = [" " + " ".join(rng.choice(words, size=1 + (j + i) % 3)) for j in range(3 + i % 2)]
        mc.append({"context": ctx + (" " if i % 3 == 0 else ""), "choices": choices,
                   "gold": int(rng.integers(len(choices)))})
        boolq.append({"question": " ".join(words[i : i + 5]).lower(), "passage": CORPUS[i % len(CORPUS)],
                      "idx": i, "label": int(rng.integers(2))})
        texts = [str(w).strip(".,;?") for w in rng.choice(words, size=5)]
        csqa.append({"id": f"q{i}", "question": " ".join(words[2 * i : 2 * i + 6]) + "? ",
                     "question_concept": "x", "choices": {"label": list("ABCDE"), "text": texts},
                     "answerKey": "ABCDE"[int(rng.integers(5))]})
    paths = {}
    for kind, rows in (("mc", mc), ("boolq", boolq), ("commonsense_qa", csqa)):
        path = os.path.join(folder, f"{kind}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        paths[kind] = path
    return paths


def train_tiny_text_run(root) -> tuple[str, dict]:
    """A 2-step W4A8 run (layers scanned) of the shipped tiny Gemma-2 (``builtin:lm``) on the first
    files of its text, in ``root/run``; returns the workdir and the config (one shape for every test: the compilation
    cache serves them all)."""
    from fraqat_jax.text import builtin_teacher_dir
    from fraqat_jax.train import run

    with open(os.path.join(builtin_teacher_dir(), "train.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(4)]
    data = os.path.join(str(root), "small.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(lines)
    base = {"teacher": "builtin:lm", "data": f"text:{data}", "seq_len": 32, "batch_size": 4, "steps": 2,
            "log_every": 1, "checkpoint_every": 2, "num_samples": 1, "sample_tokens": 2, "progress": "none",
            "warmup_steps": 1, "lr": 1e-3, "scan_layers": True}  # as the Gemma-2-2B config trains
    workdir = os.path.join(str(root), "run")
    assert run(base, workdir=workdir).status == "completed"
    return workdir, base
