"""The shipped text-to-image teacher ``builtin:sana`` (fraqat_jax/assets/tiny_sana, a diffusers
SanaPipeline folder): it loads as the run's teacher, its prompt encoding in JAX is what transformers'
tokenizer and ``Gemma2Model`` give, and ``configs/sana_default.py`` trains from prompts."""

import json
import os

import numpy as np
import pytest

from fraqat_jax.data.captions import PromptEncoder, caption, prompt_digit, read_extras
from fraqat_jax.diffusion.teachers import teacher_pipeline
from fraqat_jax.family import family_for_teacher
from fraqat_jax.train import run
from fraqat_jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = teacher_pipeline("builtin:sana")


def test_the_shipped_teacher_loads_and_encodes_prompts_as_transformers_gemma2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = load_config(os.path.join(ROOT, "configs", "sana_default.py"))
    family = family_for_teacher(cfg.teacher)
    teacher = family.load_teacher(cfg)
    assert type(teacher).__name__ == "SanaTransformer2DModel" and family.name == "sana"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(FOLDER) for f in files)
    assert size < 6 * 2**20

    extras = read_extras(FOLDER)
    prompts = [caption(extras["templates"]["heldout"][0], 7), "My lucky number is 3!", ""]
    assert [prompt_digit(p) for p in prompts] == [7, 3, None]
    hidden, mask = PromptEncoder(FOLDER)(prompts)

    # the pipeline's encoding: lower-cased, padded on the right to max_sequence_length, Gemma2Model's
    # last hidden state (after the final norm)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(FOLDER, "tokenizer"))
    tok.padding_side = "right"
    length = extras["max_sequence_length"]
    inputs = tok([p.lower().strip() for p in prompts], padding="max_length", max_length=length, truncation=True,
                 add_special_tokens=True, return_tensors="pt")
    ref = transformers.Gemma2Model.from_pretrained(os.path.join(FOLDER, "text_encoder"),
                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(inputs.input_ids, attention_mask=inputs.attention_mask)[0].numpy()
    np.testing.assert_array_equal(mask, inputs.attention_mask.numpy())
    valid = mask.astype(bool)  # padded positions are masked out of the transformer's cross-attention
    assert hidden.shape == want.shape == (3, length, 64)
    assert np.abs(hidden[valid] - want[valid]).max() <= 1e-4 * np.abs(want[valid]).max()


@pytest.mark.slow
def test_the_sana_default_config_trains_from_prompts(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "sana_default.py"))
    assert (cfg.teacher, cfg.data, cfg.schedule, cfg.target_bits, cfg.act_bits) == \
        ("builtin:sana", "captions", "fraqat", 4.0, 8.0)
    workdir = str(tmp_path / "w")
    result = run({**dict(cfg), "steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2,
                  "sample_grids": False, "progress": "none", "warmup_steps": 1}, workdir=workdir)
    assert result.status == "completed"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "event" not in line]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
