"""``export --format diffusers`` of a run whose teacher is a whole (tiny, random) Sana pipeline: a
folder that ``diffusers.SanaPipeline.from_pretrained`` loads and runs from a prompt with every other
argument at its default, and whose images agree with ours (the student's dequantized weights with
float activations, sampled and decoded in JAX) from the same prompt and initial latents."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sana_pipeline as sp  # noqa: E402
from fraqat_jax.export import __main__ as export_cli  # noqa: E402

PROMPTS = ["a handwritten seven", "the digit 2"]
STEPS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    built = sp.sana_run(tmp_path_factory)
    out = os.path.join(built["root"], "exported_pipeline")
    info = export_cli.main(["--workdir", built["run"], "--out", out, "--format", "diffusers"])
    return built, out, info


def test_folder_layout(exported):
    _, out, info = exported
    assert info["pipeline_class"] == "SanaPipeline"
    assert info["max_rel_diff_vs_float_activations"] <= 1e-4  # transformer/ read back by the port
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(out, part)), part
    assert os.path.isfile(os.path.join(out, "model_index.json"))


def test_sana_pipeline_runs_from_a_prompt_with_defaults(exported):
    _, out, _ = exported
    pipe = diffusers.SanaPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[0], num_inference_steps=STEPS, output_type="np").images
    assert images.shape[0] == 1 and images.shape[-1] == 1 and np.isfinite(images).all()
    assert 0.0 <= images.min() <= images.max() <= 1.0


def test_images_agree_with_ours(exported):
    import jax
    from flax import nnx

    from fraqat_jax import runs
    from fraqat_jax.export.transformers import float_activation_copy
    from fraqat_jax.family import family_for_model

    built, out, _ = exported
    teacher, student, cfg = runs.load_run(built["run"])
    pipeline = family_for_model(teacher).prompt_pipeline(cfg)
    model = float_activation_copy(student)  # the weights diffusers gets, activations in float as diffusers runs
    graph, state = nnx.split(model)
    sample = pipeline.sampler(lambda st: nnx.merge(graph, st), num_steps=STEPS, guidance_scale=4.5)
    noise = jax.random.normal(jax.random.key(3), (len(PROMPTS), *pipeline.latent_shape(teacher.config)))
    cond = {k: jax.numpy.asarray(v) for k, v in pipeline.encode(PROMPTS).items()}
    null = {k: jax.numpy.asarray(v) for k, v in pipeline.null().items()}
    ours = pipeline.decode(sample(state, noise, cond, jax.random.key(0), null))
    ours = np.clip(ours / 2 + 0.5, 0, 1)
    theirs = sp.diffusers_images(out, PROMPTS, np.asarray(noise), STEPS)
    assert sp.psnr01(ours, theirs) >= 35.0
    # and not by accident: the teacher's pipeline gives other images from the same noise
    assert sp.psnr01(sp.diffusers_images(built["pipe"], PROMPTS, np.asarray(noise), STEPS), theirs) < 60.0
