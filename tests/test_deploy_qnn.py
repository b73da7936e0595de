"""The text-to-image pipeline folder of ``export --format qnn`` on QNN HTP (the simulator of the
``onnxruntime-qnn`` wheel): ``configs/sana_default.py`` (the shipped ``builtin:sana`` pipeline: tiny
Gemma-2 text encoder, Sana transformer, DC-AE) trained a step with ``act_ranges=static`` and exported
from the command line: the text encoder and decoder W8A16 (``--component-bits`` 8), the W4A8
student. Every node of the three networks on HTP with CPU fallback disabled; ``python -m
fraqat_jax.deploy --prompt`` against the same pipeline in JAX (same quantization, prompt, seed; the
family's own sampler) and against the CPU provider; prompt sensitivity (cond - uncond) step by step."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_qnn")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

import fraqat_jax  # noqa: E402
from fraqat_jax import deploy  # noqa: E402
from fraqat_jax.deploy import image as deploy_image  # noqa: E402
from fraqat_jax.export import qnn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a handwritten seven"
STEPS = 4  # the runner's steps here (the folder's default is the pipeline's 20): 8 transformer calls on HTP


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.fixture(scope="module")
def sana_qnn_export(tmp_path_factory):
    """``configs/sana_default.py`` trained one step with static input ranges, then ``export --format
    qnn`` on it: ``(folder, report, printed, workdir)``."""
    import contextlib
    import io

    from fraqat_jax import export
    from fraqat_jax.export import __main__ as export_cli
    from fraqat_jax.train import run
    from fraqat_jax.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "sana_default.py"))
    root = tmp_path_factory.mktemp("sana_qnn")
    workdir, out = str(root / "run"), root / "qnn"
    result = run({**dict(cfg), "steps": 1, "batch_size": 2, "log_every": 1, "checkpoint_every": 1, "warmup_steps": 0,
                  "sample_grids": False, "progress": "none", "act_ranges": "static"}, workdir=workdir)
    assert result.status == "completed"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(export_cli, "PIPELINE_PROMPTS", 4)  # calibration prompts (20 by default): the suite's time
        report = export.main(["--workdir", workdir, "--out", str(out), "--format", "qnn"])
    return out, report, printed.getvalue(), workdir


def _args(folder, out, provider, prompt=PROMPT, seed=3):
    return argparse.Namespace(folder=str(folder), prompt=prompt, label=None, seed=seed, provider=provider, out=str(out),
                              steps=STEPS, guidance=None)


@pytest.mark.slow
def test_sana_default_run_exports_the_pipeline_folder_that_runs_whole_on_qnn_htp(sana_qnn_export, tmp_path, capsys):
    import jax
    import onnx
    from flax import nnx

    from fraqat_jax.data.captions import read_extras
    from fraqat_jax.diffusion import model_sampler
    from fraqat_jax.diffusion.pipeline import scheduler_shift
    from fraqat_jax.diffusion.teachers import teacher_pipeline
    from fraqat_jax.export.onnx import static_view
    from fraqat_jax.export.qnn_pipeline import jitted

    folder, report, printed, _ = sana_qnn_export
    teacher = teacher_pipeline("builtin:sana")
    extras = read_extras(teacher)
    # The layout: three networks, the tokenizer, the constants, the manifest.
    assert {"text_encoder", "transformer", "vae_decoder", "tokenizer", "constants", "pipeline.json"} <= set(
        os.listdir(folder)) and not (folder / "model.onnx").exists()
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert manifest["kind"] == "image" and manifest["conditioning"] == "text"
    assert set(manifest["components"]) == {"text_encoder", "transformer", "vae_decoder"}
    assert manifest["text"]["length"] == extras["max_sequence_length"] and manifest["text"]["lowercase"] is True
    settings = manifest["sampler"]
    assert (settings["name"], settings["shift"]) == ("flow_dpmsolver++", scheduler_shift(Path(teacher)))
    assert manifest["latent"]["shape"][:2] == [1, 4] and manifest["soc"]["htp_arch"] == 79
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    for name in ("uncond_embedding", "uncond_mask"):
        assert (folder / manifest["text"][name]).is_file()
    assert manifest["components"]["vae_decoder"]["quantization"]["weights"].startswith("int8 per output channel")
    assert report["component_bits"] == 8 and "text_encoder W8A16" in printed and "vae_decoder W8A16" in printed
    for name, fig in report["figures"].items():  # every node on HTP (fallback disabled), agreement per network
        print(name, {k: fig[k] for k in ("nodes", "max_rel_diff_ort", "fp16_sensitivity", "max_rel_diff_student",
                                          "context_bytes")})
        entry = manifest["components"][name]
        for key in ("onnx", "context", "report"):
            assert os.path.isfile(folder / entry[key]) and os.path.dirname(entry[key]) == name
        assert json.loads((folder / entry["report"]).read_text())["nodes_on_qnn"] == fig["nodes"] == fig["nodes_on_qnn"]
        assert {n.op_type for n in onnx.load(str(folder / entry["context"])).graph.node} == {"EPContext"}
        # HTP against onnxruntime CPU within the tolerance derived from what fp16 rounding moves on the CPU.
        assert 0 < fig["fp16_sensitivity"] and fig["tol_ort"] == qnn.ort_tolerance(fig["fp16_sensitivity"])
        assert fig["max_rel_diff_ort"] <= fig["tol_ort"] and fig["max_rel_diff_student"] <= qnn.TOL_STUDENT
        assert fig["max_rel_diff_context"] <= qnn.TOL_CONTEXT
        assert entry["inputs"] and entry["outputs"]
    # The runner on QNN (the command's own code path), recording cond and uncond at every step.
    diffs_qnn, diffs_jax = [], []
    image_qnn = deploy_image.run(manifest, str(folder), _args(folder, tmp_path / "q.png", "qnn"),
                                 on_step=lambda i, c, u: diffs_qnn.append(float(np.std(c - u))))
    assert (tmp_path / "q.png").is_file()
    # The command line on the CPU provider, same prompt and seed.
    image_cpu = deploy.main([str(folder), "--prompt", PROMPT, "--seed", "3", "--steps", str(STEPS),
                             "--out", str(tmp_path / "c.png"), "--provider", "cpu"])
    assert "text_encoder:" in capsys.readouterr().out
    # The same pipeline in JAX: the frozen networks as exported, the folder's tokenizer and constants;
    # the family's own sampler (flow DPM-Solver++ at the folder's shift) from the runner's noise.
    encode = jitted(fraqat_jax.freeze(static_view(report["text_encoder"])))
    frozen = fraqat_jax.freeze(static_view(report["transformer"]))
    decode = jitted(fraqat_jax.freeze(static_view(report["vae_decoder"])))
    ids, mask = deploy_image.tokenize(str(folder), manifest["text"], PROMPT)
    emb = encode({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.float32)})
    null = np.load(folder / manifest["text"]["uncond_embedding"])
    null_mask = np.load(folder / manifest["text"]["uncond_mask"])
    noise = np.random.default_rng(3).standard_normal(manifest["latent"]["shape"]).astype(np.float32)
    cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask.astype(np.float32)}
    uncond = {"encoder_hidden_states": null, "encoder_attention_mask": null_mask.astype(np.float32)}
    guidance = manifest["sampler"]["guidance"]
    graphdef, state = nnx.split(frozen)
    sampler = model_sampler(lambda st: nnx.merge(graphdef, st).model, "sana", num_steps=STEPS,
                            guidance_scale=guidance, shift=manifest["sampler"]["shift"])
    latent = np.asarray(sampler(state, noise, cond, jax.random.key(0), uncond))
    image_jax = decode({"latent": latent / np.float32(manifest["latent"]["scaling_factor"])})[0]
    # The transformer's prompt sensitivity per step, JAX through the runner's loop.
    denoise = jitted(frozen)
    deploy_image.sample(lambda f: {"sample": denoise(f)}, manifest, noise, cond, uncond, steps=STEPS,
                        guidance=guidance, on_step=lambda i, c, u: diffs_jax.append(float(np.std(c - u))))
    ratios = np.asarray(diffs_qnn) / np.asarray(diffs_jax)
    psnr_jax, psnr_cpu = _psnr(image_qnn, image_jax), _psnr(image_qnn, image_cpu)
    print(f"sana_default pipeline ({STEPS} steps, guidance {guidance:g}): PSNR QNN vs JAX {psnr_jax:.1f} dB, QNN vs "
          f"CPU {psnr_cpu:.1f} dB; std(cond - uncond) QNN / JAX per step {np.round(ratios, 3).tolist()}")
    assert psnr_jax >= 30 and psnr_cpu >= 25
    assert len(ratios) == STEPS and np.all((ratios >= 0.8) & (ratios <= 1.25))


def test_component_bits_is_8_or_4_and_only_for_qnn(tmp_path, capsys):
    """Checked before the run is read (``--workdir`` need not hold one)."""
    from fraqat_jax import export

    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "a"), "--format", "qnn",
                     "--component-bits", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--component-bits" in err and "5" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "b.onnx"), "--format", "onnx",
                     "--component-bits", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--component-bits" in err and len(err.strip().splitlines()) == 1
