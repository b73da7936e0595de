"""The text-to-image pipeline folder of ``export --format qnn`` on QNN HTP (the simulator of the
``onnxruntime-qnn`` wheel), on a tiny random-weight Sana pipeline: the shipped tiny Gemma-2 as text
encoder (W8A16), a W4A8 Sana transformer with static input ranges, a tiny DC-AE decoder (W8A16).
Every node of the three networks on HTP with CPU fallback disabled; ``python -m fraqat_jax.deploy
--prompt`` against the same pipeline in JAX (same quantization, prompt, seed) and against the CPU
provider; prompt sensitivity (cond - uncond) step by step."""

from __future__ import annotations

import argparse
import json
import os

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
GEMMA = os.path.join(ROOT, "fraqat_jax", "assets", "tiny_gemma2")
PROMPTS = [f"a handwritten digit {k}" for k in range(6)]
HELDOUT = ["the digit seven, written by hand", "a small number nine"]
TEXT_LENGTH, LATENT = 16, (1, 4, 8, 8)
DC_TINY = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
               encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
               encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
               encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
               downsample_block_type="conv", upsample_block_type="interpolate",
               decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
SANA_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=64,
                 mlp_ratio=2.0, sample_size=8, patch_size=1, interpolation_scale=None, attention_bias=True)


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from flax import nnx

    from fraqat_jax.diffusion.phone import DecoderGraph, TextEncoderGraph, TransformerGraph, sampler_settings
    from fraqat_jax.export.qnn_pipeline import export_image_pipeline, jitted
    from fraqat_jax.models import from_transformers
    from fraqat_jax.models.autoencoder_dc import AutoencoderDC
    from fraqat_jax.models.sana import SanaTransformer2DModel

    text_encoder = TextEncoderGraph(from_transformers(GEMMA).model)
    encode = jitted(text_encoder)
    rules = [fraqat_jax.Rule(".*proj_out", weight_bits=4, act_bits=None, channel_axis=-1),
             fraqat_jax.Rule(".*", weight_bits=4, act_bits=8, channel_axis=-1, act_ranges="static")]
    student = fraqat_jax.quantize_model(TransformerGraph(SanaTransformer2DModel(SANA_TINY, rngs=nnx.Rngs(0))), rules)
    rng = np.random.default_rng(5)
    mask = (np.arange(TEXT_LENGTH) < 10)[None].astype(np.float32)
    embeddings = [encode({"input_ids": np.asarray([[2] + [int(i) for i in rng.integers(3, 2048, 9)] + [0] * 6], np.int32),
                          "attention_mask": mask}) for _ in range(8)]
    # Static input ranges, as training with act_ranges=static leaves them (here: calibrated once).
    fraqat_jax.calibrate(student, [{"hidden_states": rng.standard_normal(LATENT).astype(np.float32),
                                    "timestep": np.asarray([rng.uniform(0, 1000)], np.float32),
                                    "encoder_hidden_states": e, "encoder_attention_mask": mask} for e in embeddings])
    vae = DecoderGraph(AutoencoderDC(DC_TINY, rngs=nnx.Rngs(1)))
    sampler = sampler_settings("sana", steps=6, guidance=4.5, shift=3.0, name="flow_dpmsolver++")
    out = tmp_path_factory.mktemp("sana_pipeline") / "qnn"
    report = export_image_pipeline(text_encoder, student, vae, os.path.join(GEMMA, "tokenizer.json"), str(out),
                                   prompts=PROMPTS, heldout_prompts=HELDOUT, text_length=TEXT_LENGTH, sampler=sampler,
                                   latent_shape=LATENT)
    return out, report, student


def _args(folder, out, provider, prompt=HELDOUT[0], seed=3):
    return argparse.Namespace(folder=str(folder), prompt=prompt, label=None, seed=seed, provider=provider, out=str(out),
                              steps=None, guidance=None)


@pytest.mark.slow
def test_tiny_sana_pipeline_runs_whole_on_qnn_htp_and_agrees_with_jax(tiny_pipeline, tmp_path, capsys):
    from fraqat_jax.export.onnx import static_view
    from fraqat_jax.export.qnn_pipeline import jitted

    folder, report, student = tiny_pipeline
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert manifest["kind"] == "image" and set(manifest["components"]) == {"text_encoder", "transformer", "vae_decoder"}
    for name, fig in report["figures"].items():  # every node on HTP (fallback disabled), agreement per network
        print(name, {k: fig[k] for k in ("nodes", "max_rel_diff_ort", "max_rel_diff_student", "context_bytes")})
        assert fig["nodes_on_qnn"] == fig["nodes"]
        assert fig["max_rel_diff_ort"] <= qnn.TOL_ORT and fig["max_rel_diff_student"] <= qnn.TOL_STUDENT
        assert fig["max_rel_diff_context"] <= qnn.TOL_CONTEXT
        entry = manifest["components"][name]
        assert os.path.isfile(folder / entry["context"]) and entry["inputs"] and entry["outputs"]
    # The runner on QNN (the command's own code path), recording cond and uncond at every step.
    diffs_qnn, diffs_jax = [], []
    image_qnn = deploy_image.run(manifest, str(folder), _args(folder, tmp_path / "q.png", "qnn"),
                                 on_step=lambda i, c, u: diffs_qnn.append(float(np.std(c - u))))
    assert (tmp_path / "q.png").is_file()
    # The command line on the CPU provider, same prompt and seed.
    image_cpu = deploy.main([str(folder), "--prompt", HELDOUT[0], "--seed", "3", "--out", str(tmp_path / "c.png"),
                             "--provider", "cpu"])
    assert "text_encoder:" in capsys.readouterr().out
    # The same pipeline in JAX: the frozen networks, the folder's tokenizer, constants and loop.
    encode = jitted(fraqat_jax.freeze(static_view(report["text_encoder"])))
    denoise = jitted(fraqat_jax.freeze(static_view(student)))
    decode = jitted(fraqat_jax.freeze(static_view(report["vae_decoder"])))
    ids, mask = deploy_image.tokenize(str(folder), manifest["text"], HELDOUT[0])
    emb = encode({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.float32)})
    null = np.load(folder / manifest["text"]["uncond_embedding"])
    null_mask = np.load(folder / manifest["text"]["uncond_mask"])
    noise = np.random.default_rng(3).standard_normal(LATENT).astype(np.float32)
    cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask.astype(np.float32)}
    uncond = {"encoder_hidden_states": null, "encoder_attention_mask": null_mask.astype(np.float32)}
    latent = deploy_image.sample(lambda f: {"sample": denoise(f)}, manifest, noise, cond, uncond,
                                 steps=manifest["sampler"]["steps"],
                                 guidance=manifest["sampler"]["guidance"],
                                 on_step=lambda i, c, u: diffs_jax.append(float(np.std(c - u))))
    image_jax = decode({"latent": latent / np.float32(manifest["latent"]["scaling_factor"])})[0]
    ratios = np.asarray(diffs_qnn) / np.asarray(diffs_jax)
    psnr_jax, psnr_cpu = _psnr(image_qnn, image_jax), _psnr(image_qnn, image_cpu)
    print(f"tiny Sana pipeline: PSNR QNN vs JAX {psnr_jax:.1f} dB, QNN vs CPU {psnr_cpu:.1f} dB; "
          f"std(cond - uncond) QNN / JAX per step {np.round(ratios, 3).tolist()}")
    assert psnr_jax >= 30 and psnr_cpu >= 25
    assert len(ratios) == manifest["sampler"]["steps"] and np.all((ratios >= 0.8) & (ratios <= 1.25))
