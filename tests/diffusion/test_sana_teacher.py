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


@pytest.mark.slow
def test_pretraining_fixes_a_caption_pathway_that_reads_the_digit_and_holds_it(tmp_path):
    """The teacher's recipe: the caption pathway is trained first as a pooled digit probe (one
    image-independent query shared by every block's cross-attention), then held fixed while the
    denoiser trains."""
    import shutil

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import fraqat_jax.pretrain.sana as ps

    folder = tmp_path / "sana"
    shutil.copytree(FOLDER, folder)
    templates = ["{word}", "the digit {numeral}", "a {word} in white ink"]
    extras = read_extras(folder)
    extras["templates"]["train"] = templates
    with open(folder / "fraqat.json", "w") as f:
        json.dump(extras, f)
    encoder = PromptEncoder(folder)

    def probed():
        model = ps.SanaTransformer2DModel(ps.TRANSFORMER_CONFIG, rngs=nnx.Rngs(3))
        return model, ps.init_caption_pathway(model, encoder, templates, steps=150, seed=3)

    model, accuracy = probed()
    assert accuracy >= 0.9  # 30 captions; chance is 0.1
    blocks = list(model.transformer_blocks)
    for block in blocks:
        assert not np.any(np.asarray(block.attn2.to_q.kernel[...]))
        for name in ("to_q", "to_k", "to_v"):
            for part in ("kernel", "bias"):
                np.testing.assert_array_equal(getattr(getattr(block.attn2, name), part)[...],
                                              getattr(getattr(blocks[0].attn2, name), part)[...])
    # the query no longer depends on the image: the cross-attention weights are the same for any input
    hidden, mask = encoder(["the digit 7"])
    context = model.caption_norm(model.caption_projection(jnp.asarray(hidden)))
    a = blocks[1].attn2(jax.random.normal(jax.random.key(0), (1, 4, 64)), context)
    np.testing.assert_allclose(np.asarray(a[0, 0]), np.asarray(a[0, 3]), rtol=0, atol=1e-5)

    # denoising holds the pathway fixed and trains the rest
    graph, before, _ = nnx.split(model, nnx.Param, ...)
    trained, _ = ps.pretrain_transformer(folder, 2, batch_size=4, seed=3, probe_steps=150, ema_decay=0.0)
    after = nnx.state(trained, nnx.Param)
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    changed = {jax.tree_util.keystr(p): bool(np.any(np.asarray(v) != np.asarray(flat_before[p])))
               for p, v in jax.tree_util.tree_flatten_with_path(after)[0]}
    fixed = {p for p in changed if ps._caption_pathway(p)}
    assert len(fixed) == 5 + 6 * len(blocks) and not any(changed[p] for p in fixed)
    assert any(changed[p] for p in changed if p not in fixed and "proj_out" in p)
