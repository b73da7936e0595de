"""Text-to-image end to end on tiny offline pipelines (SD3, PixArt-Sigma): cache images and prompts
with ``scripts/cache_latents.py``, train a few steps, ``python -m fraqat_jax.eval --prompts --vae``;
the metrics against numpy on the saved arrays, the teacher's samples against the diffusers pipeline
sampling the same noise, and the JAX decode against diffusers' VAE."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import t2i_pipelines as tp  # noqa: E402
from fraqat_jax.data.latents import read_prompts, write_prompts  # noqa: E402
from fraqat_jax.eval import __main__ as eval_cli  # noqa: E402
from fraqat_jax.train import __main__ as train_cli  # noqa: E402

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "cache_latents.py")
SAMPLE_STEPS = 2
GUIDANCE = {"sd3": 7.0, "pixart": 4.5}  # the pipelines' defaults, which eval must pick by itself


def _cache_latents(argv):
    spec = importlib.util.spec_from_file_location("cache_latents", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def evaluated(request, tmp_path_factory):
    """A pipeline, its training cache and prompt cache, a 2-step run on the cache and its eval."""
    family = request.param
    root = tmp_path_factory.mktemp(f"t2i_{family}")
    pipe = (tp.build_sd3_pipeline if family == "sd3" else tp.build_pixart_pipeline)(str(root / "pipe"))
    seq = ["--max-sequence-length", str(tp.MAX_SEQUENCE_LENGTH)]
    captions = tp.write_images(str(root / "images"))
    _cache_latents(["--pipeline", pipe, "--images", str(root / "images"), "--captions", captions,
                    "--size", str(tp.IMAGE_SIZE), "--out", str(root / "train_cache"), *seq])
    _cache_latents(["--prompts", tp.write_prompts_file(str(root / "prompts.txt")), "--pipeline", pipe,
                    "--out", str(root / "prompts"), *seq])
    run = str(root / "run")
    with pytest.MonkeyPatch.context() as mp:  # the CLI would turn on XLA's disk cache for this whole process
        mp.setenv("FRAQAT_COMPILATION_CACHE", "0")
        trained = train_cli.main(["--workdir", run, "--steps", "2", "--log-every", "1",
                                  "--set", f"teacher={pipe}/transformer", "--set", f"data=latents:{root / 'train_cache'}",
                                  "--set", "batch_size=2", "--set", "sample_grids=false", "--set", "warmup_steps=0",
                                  "--set", "lr=1e-2", "--set", "progress=none", "--set", "schedule=constant"])
    assert trained == 0
    result = eval_cli.main(["--workdir", run, "--prompts", str(root / "prompts"), "--vae", f"{pipe}/vae",
                            "--sample-steps", str(SAMPLE_STEPS), "--batch-size", "4", "--save-arrays"])
    return family, root, pipe, run, result


def test_eval_json_and_images(evaluated):
    family, root, _, run, result = evaluated
    saved = json.loads(open(os.path.join(run, "eval.json")).read())
    assert saved["latent_mse"] == pytest.approx(result["latent_mse"])
    assert saved["mode"] == "t2i" and saved["family"] == family and saved["step"] == 2 and saved["bits"] == 4.0
    assert saved["sample_steps"] == SAMPLE_STEPS and saved["guidance_scale"] == GUIDANCE[family]
    assert saved["shift"] == (3.0 if family == "sd3" else 1.0)  # SD3: the scheduler config's shift
    assert saved["num_samples"] == len(tp.PROMPTS) and saved["latent_shape"][1:] == [tp.LATENT_SIZE] * 2
    for key in ("latent_mse", "mse", "psnr"):
        assert np.isfinite(saved[key]) and saved[key] > 0, key
    assert saved["fid"] is None  # no --inception-weights
    images = saved["images_dir"]
    assert images == os.path.join(run, "eval_images")
    rows = [json.loads(line) for line in open(os.path.join(images, "captions.jsonl"))]
    assert [r["prompt"] for r in rows] == tp.PROMPTS
    from PIL import Image

    arrays = np.load(os.path.join(images, "arrays.npz"))
    for i, r in enumerate(rows):
        assert r["file"].startswith(f"{i:05d}_") and "-".join(tp.PROMPTS[i].split()) in r["file"]
        png = np.asarray(Image.open(os.path.join(images, r["file"])))
        assert png.shape == (2 * tp.IMAGE_SIZE, tp.IMAGE_SIZE, 3)  # teacher above student
        for half, name in ((png[: tp.IMAGE_SIZE], "teacher_images"), (png[tp.IMAGE_SIZE:], "student_images")):
            want = np.floor((np.clip(arrays[name][i], -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8).transpose(1, 2, 0)
            assert np.abs(half.astype(int) - want).max() <= 1


def test_metrics_match_numpy_on_the_saved_arrays(evaluated):
    _, _, _, run, result = evaluated
    a = np.load(os.path.join(result["images_dir"], "arrays.npz"))
    t_img, s_img = a["teacher_images"].astype(np.float64), a["student_images"].astype(np.float64)
    assert t_img.min() >= -1 and t_img.max() <= 1  # saved clipped, as scored
    per_image = ((s_img - t_img) ** 2).reshape(len(t_img), -1).mean(axis=1)
    assert result["mse"] == pytest.approx(per_image.mean(), rel=1e-5)
    assert result["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / per_image)), rel=1e-5)
    lat = ((a["student_latents"].astype(np.float64) - a["teacher_latents"]) ** 2).mean()
    assert result["latent_mse"] == pytest.approx(lat, rel=1e-5)
    assert not np.allclose(a["teacher_latents"], a["student_latents"])  # W4A8 differs from the teacher


def test_teacher_samples_match_the_diffusers_pipeline(evaluated):
    """The teacher's JAX samples equal diffusers' pipeline from the same noise and cached embeddings
    (SD3: its own FlowMatchEuler scheduler; PixArt: DDIM, the sampler we use in place of DPM-Solver)."""
    family, root, pipe_dir, _, result = evaluated
    a = np.load(os.path.join(result["images_dir"], "arrays.npz"))
    import jax

    # The eval's starting noise: normal(fold_in(key(seed), i)) for sample i (seed 0).
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                                   tuple(result["latent_shape"]))) for i in range(len(tp.PROMPTS))])
    cache = read_prompts(str(root / "prompts"))
    t = {k: torch.from_numpy(np.asarray(v[:])) for k, v in cache.cond.items()}
    n = {k: torch.from_numpy(np.repeat(np.asarray(v), len(tp.PROMPTS), 0)) for k, v in cache.null.items()}
    kw = dict(num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE[family], latents=torch.from_numpy(noise),
              height=tp.IMAGE_SIZE, width=tp.IMAGE_SIZE, output_type="latent")
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
        kw.update(prompt_embeds=t["encoder_hidden_states"], pooled_prompt_embeds=t["pooled_projections"],
                  negative_prompt_embeds=n["encoder_hidden_states"], negative_pooled_prompt_embeds=n["pooled_projections"])
    else:
        pipe = diffusers.PixArtSigmaPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
        pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
        kw.update(prompt_embeds=t["encoder_hidden_states"], prompt_attention_mask=t["encoder_attention_mask"],
                  negative_prompt_embeds=n["encoder_hidden_states"],
                  negative_prompt_attention_mask=n["encoder_attention_mask"], negative_prompt=None,
                  use_resolution_binning=False)
    with torch.no_grad():
        want = pipe(**kw).images.numpy()
    np.testing.assert_allclose(a["teacher_latents"], want, rtol=1e-3, atol=1e-3)
    # The JAX decode against diffusers' VAE on the same latents (images compared unclipped inside [-1, 1]).
    vae = pipe.vae
    z = torch.from_numpy(a["teacher_latents"]) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.no_grad():
        img = vae.decode(z).sample.clamp(-1, 1).numpy()
    np.testing.assert_allclose(a["teacher_images"], img, atol=2e-4)


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


def test_cached_images_and_captions_match_diffusers(evaluated):
    """``cache_latents.py --pipeline``: the VAE posterior's mode scaled as the pipeline scales, and
    encode_prompt's outputs, on independently preprocessed images (16x18: resizing the shorter side
    to 16 is the identity, the centre crop drops the first and last row)."""
    family, root, pipe_dir, _, _ = evaluated
    from PIL import Image

    from fraqat_jax.data import read_latents

    src = read_latents(str(root / "train_cache"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipe_dir, transformer=None, torch_dtype=torch.float32)
    pix = np.stack([np.asarray(Image.open(root / "images" / f"img{i}.png"), np.float32)[1:-1] / 127.5 - 1
                    for i in range(len(tp.CAPTIONS))])
    with torch.no_grad():
        z = pipe.vae.encode(torch.from_numpy(pix.transpose(0, 3, 1, 2))).latent_dist.mode()
    cfg = pipe.vae.config
    want = {"latents": (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor,
            **_prompt_outputs(family, pipe, tp.CAPTIONS)[0]}
    assert sorted(src.arrays) == sorted(want)
    for k, v in want.items():  # floats stored as float16
        np.testing.assert_allclose(np.asarray(src.arrays[k][:], np.float32), v.float().numpy(), rtol=2e-3, atol=2e-3)
    assert src.info["mode"] == "encoded" and src.info["scaling_factor"] == pytest.approx(cfg.scaling_factor)

    # cache_latents.py --prompts: the prompts and the pipeline's encoding of its negative prompt "".
    cache = read_prompts(str(root / "prompts"))
    assert cache.prompts == tp.PROMPTS
    cond, null = _prompt_outputs(family, pipe, tp.PROMPTS)
    for got, ref in ((cache.cond, cond), (cache.null, null)):
        assert sorted(got) == sorted(ref)
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(got[k][:], np.float32), v.float().numpy(), rtol=2e-3, atol=2e-3)
    if family == "pixart":  # the empty prompt's mask keeps only its end-of-text token
        assert cache.null["encoder_attention_mask"].tolist() == [[1] + [0] * (tp.MAX_SEQUENCE_LENGTH - 1)]
    assert cache.info["scheduler"]["_class_name"] == type(pipe.scheduler).__name__


@pytest.mark.parametrize("evaluated", ["sd3"], indirect=True)  # one family is enough for the input checks
def test_bad_inputs_exit_2_naming_both_sides(evaluated, tmp_path, capsys):
    family, root, pipe, run, _ = evaluated
    other = tp.save_vae(str(tmp_path / "vae4"), 4)
    base = ["--workdir", run, "--prompts", str(root / "prompts"), "--sample-steps", "1"]
    cases = [
        (["--vae", other], ["4 latent channels", "16-channel", "sd3 teacher"]),
        (["--vae", f"{pipe}/transformer"], ["'SD3Transformer2DModel'", "not a VAE", "16-channel"]),
    ]
    narrow = str(tmp_path / "narrow")
    write_prompts(narrow, {"encoder_hidden_states": np.zeros((1, 4, 12), np.float16),
                           "pooled_projections": np.zeros((1, 16), np.float16)},
                  {"encoder_hidden_states": np.zeros((1, 4, 12), np.float16),
                   "pooled_projections": np.zeros((1, 16), np.float16)}, ["x"])
    cases.append((["--vae", pipe, "--prompts", narrow], ["12 wide", f"joint_attention_dim={tp.T5_WIDTH}"]))
    cases.append((["--vae", pipe, "--prompts", str(tmp_path / "missing")], ["no such folder"]))
    capsys.readouterr()  # progress bars of the VAE's save_pretrained
    for extra, words in cases:
        with pytest.raises(SystemExit) as e:
            eval_cli.main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        for w in words:
            assert w in err, (w, err)


@pytest.mark.slow
@pytest.mark.parametrize("evaluated", ["sd3"], indirect=True)  # one family is enough for the mesh
def test_two_devices_give_the_same_scores(evaluated, tmp_path):
    """``--mesh data=2`` on two simulated CPU devices: prompts split over the devices (3 prompts padded
    to a batch of 4), the same metrics and images as on one device."""
    family, root, pipe, run, result = evaluated
    out = str(tmp_path / "eval2.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-m", "fraqat_jax.eval", "--workdir", run, "--prompts", str(root / "prompts"),
                        "--vae", pipe, "--sample-steps", str(SAMPLE_STEPS), "--batch-size", "3", "--mesh", "data=2",
                        "--out", out], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(open(out).read())
    assert two["mesh"]["data"] == 2 and two["batch_size"] == 4 and two["num_samples"] == 3
    for key in ("latent_mse", "mse", "psnr"):
        assert two[key] == pytest.approx(result[key], rel=1e-4), key
    assert sorted(os.listdir(two["images_dir"])) == sorted(f for f in os.listdir(result["images_dir"]) if f != "arrays.npz")
