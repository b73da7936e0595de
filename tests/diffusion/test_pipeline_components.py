"""The family seam of the phone export: ``Family.pipeline_components`` of a Sana run whose teacher is
the shipped ``builtin:sana`` pipeline folder gives networks and host settings that encode, sample and
decode as the JAX prompt pipeline does (``fraqat_jax.diffusion.pipeline.PromptPipeline``); a family
or a teacher without such a pipeline answers CapabilityError (export keeps one network)."""

import os
import types

import jax
import numpy as np
import pytest

from fraqat_jax.data.captions import prompt_digit, read_extras
from fraqat_jax.diffusion.pipeline import PromptPipeline, pipeline_folder, scheduler_shift
from fraqat_jax.family import CapabilityError, PipelineComponents, family_named
from fraqat_jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sana_gives_the_pipeline_of_its_teacher_folder():
    pytest.importorskip("tokenizers")
    from fraqat_jax.deploy.image import tokenize
    from fraqat_jax.export.qnn_pipeline import jitted

    cfg = load_config(os.path.join(ROOT, "configs", "sana_default.py"))
    family = family_named("sana")
    student = family.load_teacher(cfg)  # any model of the run's structure stands in for the student
    parts = family.pipeline_components(cfg, student)
    assert isinstance(parts, PipelineComponents)
    folder = pipeline_folder(cfg.teacher)
    pipe = PromptPipeline(folder, family)
    extras = read_extras(folder)

    # Text: the folder's tokenizer file, as the runner reads it, gives the ids and mask of the
    # training's prompt encoding, and the text encoder graph the same embedding.
    prompt = "A Handwritten SEVEN "
    text = {"tokenizer": os.path.relpath(parts.tokenizer_file, folder), "length": parts.text_length,
            "pad_id": parts.pad_id, "lowercase": parts.lowercase}
    ids, mask = tokenize(str(folder), text, prompt)
    want_ids, want_mask = pipe.encoder.tokenize([prompt])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    got = jitted(parts.text_encoder)({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.float32)})
    want = pipe.encode([prompt])["encoder_hidden_states"]
    valid = want_mask.astype(bool)
    assert np.abs(got[valid] - want[valid]).max() <= 1e-5 * np.abs(want[valid]).max()

    # Latents: the shape the JAX pipeline samples; the decoder graph on raw latents is its decode.
    assert parts.latent_shape == (1, *pipe.latent_shape(dict(student.config)))
    z = np.random.default_rng(0).standard_normal(parts.latent_shape).astype(np.float32)
    scale = parts.vae_decoder.vae.scaling_factor
    image = jitted(parts.vae_decoder)({"latent": z / np.float32(scale)})
    np.testing.assert_allclose(image, np.clip(pipe.decode(z), -1, 1), atol=1e-5)

    # Denoiser: the student, called with the folder's keyword inputs.
    cond = pipe.encode([prompt])
    feeds = {"hidden_states": z, "timestep": np.asarray([500.0], np.float32),
             "encoder_hidden_states": cond["encoder_hidden_states"],
             "encoder_attention_mask": cond["encoder_attention_mask"].astype(np.float32)}
    out = jitted(parts.transformer)(feeds)
    ref = np.asarray(jax.jit(lambda m, f: m(**f))(student, {**feeds, "encoder_attention_mask":
                                                           cond["encoder_attention_mask"]}))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    # Sampler: the family's flow DPM-Solver++ at the folder's shift, the pipeline's defaults.
    assert dict(parts.sampler) == {"name": "flow_dpmsolver++", "num_train_timesteps": 1000,
                                   "shift": scheduler_shift(folder), "timesteps_per_sigma": 1000.0,
                                   "steps": pipe.default_steps, "guidance": pipe.default_guidance}
    # Prompts: every training caption once (calibration), the held-out captions apart.
    train, held = extras["templates"]["train"], extras["templates"]["heldout"]
    assert len(parts.prompts) == 10 * len(train) == len(set(parts.prompts))
    assert len(parts.heldout_prompts) == 10 * len(held) and not set(parts.prompts) & set(parts.heldout_prompts)
    assert len({prompt_digit(p) for p in parts.prompts[:20]}) >= 5  # shuffled: a prefix spreads over the digits
    assert {prompt_digit(p) for p in parts.heldout_prompts} == set(range(10))


def test_no_pipeline_is_a_capability_error(tmp_path):
    with pytest.raises(CapabilityError, match="'dit' cannot export a text-to-image phone pipeline"):
        family_named("dit").pipeline_components(types.SimpleNamespace(teacher="builtin"), None)
    with pytest.raises(CapabilityError, match="not a pipeline folder"):  # a Sana transformer without its pipeline
        family_named("sana").pipeline_components(types.SimpleNamespace(teacher=str(tmp_path)), None)
