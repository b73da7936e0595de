"""``python -m fraqat_jax.eval --prompts FILE`` on a run whose teacher is a whole (tiny, random)
Sana pipeline: the teacher's images against diffusers' ``SanaPipeline`` on the teacher folder from
the same noise, the scores recomputed with numpy / scipy from the saved images, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sana_pipeline as sp  # noqa: E402
from fraqat_jax.eval import __main__ as eval_cli  # noqa: E402
from fraqat_jax.eval.prompted import box_average  # noqa: E402

PROMPTS = ["a picture of a seven", "the digit 3 in ink", "", "One, written by hand"]  # a blank line is skipped
DIGITS = [7, 3, 1]
STEPS = 3


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    built = sp.sana_run(tmp_path_factory)
    root = built["root"]
    path = os.path.join(root, "prompts.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    out = os.path.join(root, "eval_prompts_run.json")
    result = eval_cli.main(["--workdir", built["run"], "--prompts", path, "--out", out, "--sample-steps", str(STEPS),
                            "--batch-size", "2", "--save-arrays"])
    return built, out, result


def test_eval_json_holds_the_three_models(evaluated):
    _, out, result = evaluated
    saved = json.load(open(out))
    assert saved["teacher"]["accuracy"] == result["teacher"]["accuracy"]
    for name in ("teacher", "student", "student_frozen"):
        assert set(saved[name]) >= {"accuracy", "fd"}, name
        assert 0.0 <= saved[name]["accuracy"] <= 1.0 and saved[name]["fd"] >= 0
    for name in ("student", "student_frozen"):
        assert saved[name]["psnr"] > 0 and np.isfinite(saved[name]["psnr"])
    assert saved["sampler"] == "flow_dpm" and saved["shift"] == 3.0 and saved["guidance_scale"] == 4.5
    assert saved["num_prompts"] == 3 and saved["sample_steps"] == STEPS and saved["step"] == 2
    assert saved["latent_shape"] == [4, sp.LATENT_SIZE, sp.LATENT_SIZE]
    rows = [json.loads(line) for line in open(saved["predictions"])]
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS if p] and [r["digit"] for r in rows] == DIGITS
    from PIL import Image

    grid = np.asarray(Image.open(saved["grid"]))
    assert grid.shape[0] < grid.shape[1]  # two rows (teacher, student), one column per prompt


def test_teacher_images_match_diffusers_sana_pipeline(evaluated):
    """The eval's teacher images (our text encoder, flow DPM-Solver++, DC-AE, all in JAX) against
    diffusers' SanaPipeline on the teacher folder, same prompts and initial latents, fp32."""
    built, out, _ = evaluated
    arrays = np.load(os.path.splitext(out)[0] + "_prompts.npz")
    want = sp.diffusers_images(built["pipe"], [p for p in PROMPTS if p], arrays["noise"], STEPS)
    got = np.clip(arrays["teacher_images"] / 2 + 0.5, 0, 1)
    assert sp.psnr01(got, want) >= 35.0


def _fd(a, b):
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_scores_recomputed_from_the_saved_images(evaluated):
    _, out, result = evaluated
    from fraqat_jax.data.sources import digits
    from fraqat_jax.eval.classifier import DigitsClassifier

    arrays = np.load(os.path.splitext(out)[0] + "_prompts.npz")
    clf = DigitsClassifier.load()
    real = clf.features(digits().arrays["latents"]).astype(np.float64)
    teacher = arrays["teacher_images"].astype(np.float64)
    for name in ("teacher", "student", "student_frozen"):
        images = arrays[f"{name}_images"].astype(np.float64)
        small = images.reshape(len(images), 1, 8, 4, 8, 4).mean(axis=(3, 5))  # 4x4 boxes of the 32x32 images
        assert result[name]["accuracy"] == pytest.approx(np.mean(clf.predict(small.astype(np.float32)) == DIGITS))
        feats = clf.features(small.astype(np.float32)).astype(np.float64)
        assert result[name]["fd"] == pytest.approx(_fd(feats, real), rel=1e-3, abs=1e-3)
        if name != "teacher":
            per_image = ((images - teacher) ** 2).reshape(len(images), -1).mean(axis=1)
            assert result[name]["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / per_image)), rel=1e-6)
    assert not np.allclose(arrays["student_images"], teacher)  # W4A8 differs from the teacher


def test_box_average_gives_an_enlarged_digit_back():
    digits8 = np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    big = np.kron(digits8, np.ones((1, 1, 4, 4), np.float32))
    np.testing.assert_allclose(box_average(big), digits8, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="30x30"):
        box_average(np.zeros((1, 1, 30, 30)))


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_prompt_files_exit_2(tmp_path, capsys):
    run = str(tmp_path)  # checked before any run is read
    empty, latin, eleven = tmp_path / "empty.txt", tmp_path / "latin.txt", tmp_path / "eleven.txt"
    empty.write_text("\n  \n")
    latin.write_bytes("un caf\xe9 sept".encode("latin-1"))
    eleven.write_text("a handwritten seven\na handwritten eleven\n")
    _fails(["--workdir", run, "--prompts", str(empty)], capsys, "empty")
    _fails(["--workdir", run, "--prompts", str(latin)], capsys, "not UTF-8")
    _fails(["--workdir", run, "--prompts", str(eleven)], capsys, "prompt 2", "eleven", "names no digit", "zero")


def test_a_teacher_without_text_encoder_exits_2(evaluated, tmp_path, capsys):
    built, _, _ = evaluated
    # the same run, its teacher named by a copy of the transformer alone: no text encoder, no autoencoder
    shutil.copytree(os.path.join(built["pipe"], "transformer"), tmp_path / "transformer_only")
    shutil.copytree(built["run"], tmp_path / "run")
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    cfg["teacher"] = str(tmp_path / "transformer_only")
    json.dump(cfg, open(tmp_path / "run" / "config.json", "w"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten seven\n")
    _fails(["--workdir", str(tmp_path / "run"), "--prompts", str(prompts)], capsys, "text encoder", "transformer_only")


def test_generate_from_prompts_matches_diffusers_sana_pipeline(evaluated, tmp_path):
    """python -m fraqat_jax.generate --prompt on a pipeline run: one PNG per prompt, the teacher's images
    equal diffusers' SanaPipeline on the teacher folder from the same initial latents (uint8 PNGs:
    half a level of rounding is far above the 35 dB floor)."""
    from PIL import Image

    from fraqat_jax.diffusion.samplers import make_noise
    from fraqat_jax.generate.__main__ import main as generate_main

    built, _, _ = evaluated
    prompts = [p for p in PROMPTS if p][:2]
    out = tmp_path / "png"
    argv = ["--workdir", built["run"], "--model", "teacher", "--steps", str(STEPS), "--seed", "5", "--out", str(out)]
    for p in prompts:
        argv += ["--prompt", p]
    assert generate_main(argv) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == len(prompts)
    got = np.stack([np.asarray(Image.open(f), np.float64) / 255.0 for f in files])
    got = got[:, None] if got.ndim == 3 else got[..., :1].transpose(0, 3, 1, 2)  # grey written as RGB(A)
    noise, _ = make_noise(5, (len(prompts), 4, sp.LATENT_SIZE, sp.LATENT_SIZE))
    want = sp.diffusers_images(built["pipe"], prompts, np.asarray(noise), STEPS)
    assert got.shape == want.shape
    assert sp.psnr01(got, want) >= 35.0
