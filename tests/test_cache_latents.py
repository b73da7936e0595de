"""``scripts/cache_latents.py --pipeline`` (images + captions) and ``--prompts`` on tiny offline
pipelines, against diffusers' own encoders run here on the same inputs."""

import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import t2i_pipelines as tp  # noqa: E402
from fraqat_jax.data import DataSourceError, read_latents  # noqa: E402
from fraqat_jax.data.latents import read_prompts  # noqa: E402

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "cache_latents.py")


def cache_latents():
    spec = importlib.util.spec_from_file_location("cache_latents", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def pipeline(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build = tp.build_sd3_pipeline if request.param == "sd3" else tp.build_pixart_pipeline
    return request.param, build(str(root / "pipe")), root


def _reference(pipe_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(pipe_dir, transformer=None, torch_dtype=torch.float32)


def _prompt_outputs(family, pipe, prompts):
    """diffusers' encode_prompt with classifier-free guidance: (prompt fields, empty-prompt fields)."""
    kw = dict(max_sequence_length=tp.MAX_SEQUENCE_LENGTH, do_classifier_free_guidance=True, negative_prompt="")
    with torch.no_grad():
        if family == "sd3":
            e, ne, p, np_ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, **kw)
            return ({"encoder_hidden_states": e, "pooled_projections": p},
                    {"encoder_hidden_states": ne[:1], "pooled_projections": np_[:1]})
        e, m, ne, nm = pipe.encode_prompt(prompts, clean_caption=False, **kw)
        return ({"encoder_hidden_states": e, "encoder_attention_mask": m},
                {"encoder_hidden_states": ne[:1], "encoder_attention_mask": nm[:1]})


def test_pipeline_mode_matches_diffusers(pipeline, tmp_path):
    family, pipe_dir, root = pipeline
    captions = tp.write_images(str(tmp_path / "images"))
    out = str(tmp_path / "cache")
    cache_latents().main(["--pipeline", pipe_dir, "--images", str(tmp_path / "images"), "--captions", captions,
                          "--size", str(tp.IMAGE_SIZE), "--out", out, "--batch", "3",
                          "--max-sequence-length", str(tp.MAX_SEQUENCE_LENGTH)])
    src = read_latents(out)
    n = len(tp.CAPTIONS)
    rows = src.arrays
    pipe = _reference(pipe_dir)
    # Independent preprocessing: the 16x18 images have their shorter side at --size already, so
    # resizing is the identity and the centre crop drops the first and last row.
    from PIL import Image

    pix = np.stack([np.asarray(Image.open(tmp_path / "images" / f"img{i}.png"), np.float32)[1:-1] / 127.5 - 1
                    for i in range(n)])
    with torch.no_grad():
        z = pipe.vae.encode(torch.from_numpy(pix.transpose(0, 3, 1, 2))).latent_dist.mode()
    cfg = pipe.vae.config
    want = ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).numpy()
    assert rows["latents"].shape == (n, 16 if family == "sd3" else 4, tp.LATENT_SIZE, tp.LATENT_SIZE)
    np.testing.assert_allclose(rows["latents"][:], want, rtol=2e-3, atol=2e-3)  # stored as float16
    text, _ = _prompt_outputs(family, pipe, tp.CAPTIONS)
    assert sorted(rows) == sorted(["latents", *text])
    for k, v in text.items():
        np.testing.assert_allclose(np.asarray(rows[k][:], np.float32), v.float().numpy(), rtol=2e-3, atol=2e-3)
    info = src.info
    assert info["mode"] == "encoded" and info["scaling_factor"] == pytest.approx(cfg.scaling_factor)


def test_prompts_mode_matches_diffusers(pipeline, tmp_path):
    family, pipe_dir, _ = pipeline
    prompts_file = tp.write_prompts_file(str(tmp_path / "prompts.txt"))
    out = str(tmp_path / "prompts")
    cache_latents().main(["--prompts", prompts_file, "--pipeline", pipe_dir, "--out", out, "--batch", "2",
                          "--max-sequence-length", str(tp.MAX_SEQUENCE_LENGTH)])
    cache = read_prompts(out)
    assert cache.prompts == tp.PROMPTS
    want, want_null = _prompt_outputs(family, _reference(pipe_dir), tp.PROMPTS)
    assert sorted(cache.cond) == sorted(want) and sorted(cache.null) == sorted(want)
    for got, ref in ((cache.cond, want), (cache.null, want_null)):
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(got[k][:], np.float32), v.float().numpy(), rtol=2e-3, atol=2e-3)
    if family == "pixart":  # the empty prompt's mask keeps only its end-of-text token
        assert cache.null["encoder_attention_mask"].tolist() == [[1] + [0] * (tp.MAX_SEQUENCE_LENGTH - 1)]
    sched = cache.info["scheduler"]
    assert sched["_class_name"] == ("FlowMatchEulerDiscreteScheduler" if family == "sd3" else "DPMSolverMultistepScheduler")
    # A prompt cache is not training data: the trainer's reader says what it is.
    with pytest.raises(DataSourceError, match="prompt cache"):
        read_latents(out)


def test_prompt_cache_refused_when_incomplete(tmp_path):
    from fraqat_jax.data.latents import write_prompts

    cond = {"encoder_hidden_states": np.zeros((2, 3, 4), np.float16)}
    write_prompts(str(tmp_path / "c"), cond, {"encoder_hidden_states": np.ones((1, 3, 4), np.float16)}, ["a", "b"])
    got = read_prompts(str(tmp_path / "c"))
    assert got.prompts == ["a", "b"] and got.null["encoder_hidden_states"].tolist() == np.ones((1, 3, 4)).tolist()
    os.remove(tmp_path / "c" / "null" / "meta.json")
    with pytest.raises(DataSourceError, match="null.*meta.json"):
        read_prompts(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="same conditioning fields"):
        write_prompts(str(tmp_path / "d"), cond, {}, ["a", "b"])
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["info"]["mode"] == "prompts" and "latents" not in meta["fields"]
