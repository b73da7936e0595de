"""The shipped language-model teacher (fraqat_jax/assets/tiny_gemma2, ``teacher=builtin:lm``): a
transformers folder that transformers itself loads, with the logits of our port, a tokenizer that
transformers' reads alike, a held-out perplexity far below chance, and the LM default config."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from fraqat_jax import schedules
from fraqat_jax.data.text import SpecialTokens, load_tokenizer, pack_windows, read_documents, tokenize_documents
from fraqat_jax.family import family_for_teacher
from fraqat_jax.models import from_transformers
from fraqat_jax.nn import quantized_layers
from fraqat_jax.nn.graph import path_string
from fraqat_jax.text import builtin_teacher_dir
from fraqat_jax.train.config import load_config
from fraqat_jax.train.loop import build_models

TEACHER = builtin_teacher_dir()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def heldout_windows():
    config = json.load(open(os.path.join(TEACHER, "config.json")))
    docs = read_documents(os.path.join(TEACHER, "heldout.jsonl"))
    ids = tokenize_documents(load_tokenizer(TEACHER), docs)
    return pack_windows(ids, 128, SpecialTokens.from_config(config))


def test_the_folder_is_small_and_transformers_agrees_with_our_port(heldout_windows):
    size = sum(os.path.getsize(os.path.join(TEACHER, f)) for f in os.listdir(TEACHER))
    assert size < 4 * 2**20
    ref = transformers.Gemma2ForCausalLM.from_pretrained(TEACHER, attn_implementation="eager").eval()
    ours = from_transformers(TEACHER)
    ids = heldout_windows[:2]
    with torch.no_grad():
        want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    # held-out perplexity (files neither pretraining nor distillation saw), by transformers
    windows = torch.tensor(heldout_windows[:16], dtype=torch.long)
    with torch.no_grad():
        loss = ref(windows, labels=windows).loss.item()
    recorded = json.load(open(os.path.join(TEACHER, "pretraining.json")))
    assert np.exp(loss) < 100.0 and recorded["heldout_perplexity"] < 100.0  # chance: 2048


def test_transformers_tokenizer_reads_the_same_ids():
    ours = load_tokenizer(TEACHER)
    theirs = transformers.AutoTokenizer.from_pretrained(TEACHER)
    text = 'def main(argv=None):\n    """Entry point."""\n    return 0\n'
    assert theirs(text).input_ids == ours.encode(text).ids
    assert ours.encode(text).ids[0] == 2 and ours.decode(ours.encode(text).ids, skip_special_tokens=True) == text


def test_the_lm_default_config_distils_the_shipped_teacher_on_the_shipped_text_to_w4a8():
    """What configs/lm_default.py's docstring promises, read from what the config builds: the shipped
    teacher, windows of the shipped text, a W4A8 student of the blocks' linear layers (embedding and LM
    head in float) reaching 4 bits through fractional widths."""
    cfg = load_config(os.path.join(ROOT, "configs", "lm_default.py"))
    assert cfg.act_ranges == "static"  # the phone's form: the QNN export writes the student generate decodes
    family = family_for_teacher(cfg.teacher)
    teacher, student = build_models(cfg)
    assert family.name == "gemma2"
    np.testing.assert_array_equal(np.asarray(teacher.model.embed_tokens.embedding[...]),
                                  np.asarray(from_transformers(TEACHER).model.embed_tokens.embedding[...]))
    ids = family.make_source(cfg, dict(teacher.config)).batch(0, 2)["input_ids"]
    shipped = "".join(read_documents(os.path.join(TEACHER, "train.jsonl")))
    window = load_tokenizer(TEACHER).decode(ids[0].tolist(), skip_special_tokens=True)
    assert ids.shape[1] > 1 and window.strip() and window.strip()[:40] in shipped
    layers = dict(quantized_layers(student))
    linears = {path_string(p) for p, node in nnx.iter_graph(teacher) if isinstance(node, nnx.Linear)}
    assert set(layers) == {p for p in linears if p.startswith("model.layers.")} and layers
    assert not any("embed" in p or "lm_head" in p for p in layers)
    assert all(layer.act_bits == 8.0 for layer in layers.values())
    bits = schedules.by_name(cfg.schedule, cfg.steps, target_bits=cfg.target_bits).values(cfg.steps)
    assert bits[0] == 8.0 and bits[-1] == 4.0 and any(b != int(b) for b in bits)


def test_the_gemma2_2b_preset_takes_its_teacher_and_text_from_the_environment_or_set(monkeypatch, tmp_path):
    path = os.path.join(ROOT, "configs", "gemma2_2b.py")
    cfg = load_config(path)
    assert (cfg.teacher, cfg.data) == ("preset:gemma-2-2b", "text:data/c4_subset")
    assert (cfg.seq_len, cfg.batch_size, cfg.loss, cfg.schedule, cfg.target_bits, cfg.act_bits) == \
        (512, 64, "kl", "fraqat", 4.0, 8.0)
    monkeypatch.setenv("FRAQAT_TEACHER", TEACHER)
    monkeypatch.setenv("FRAQAT_TEXT", str(tmp_path))
    cfg = load_config(path)
    assert (cfg.teacher, cfg.data) == (TEACHER, f"text:{tmp_path}")
    assert load_config(path, [f"teacher={TEACHER}"]).teacher == TEACHER
    assert family_for_teacher(cfg.teacher).name == family_for_teacher("preset:gemma-2-2b").name == "gemma2"
