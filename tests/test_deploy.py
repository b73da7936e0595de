"""The host runner ``python -m fraqat_jax.deploy`` on hand-built pipeline folders (onnxruntime's CPU
provider): its schedulers against the JAX samplers on the same model function, its PNG, its
one-line errors, and that it runs where ``import jax`` fails. The QNN folders of real exports are
checked in tests/test_deploy_qnn.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
PIL = pytest.importorskip("PIL.Image")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fraqat_jax import deploy  # noqa: E402
from fraqat_jax.deploy import image as deploy_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "fraqat_jax", "assets", "tiny_gemma2", "tokenizer.json")
L, D, VOCAB = 12, 4, 2048


def _save(path, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _f(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _label_folder(tmp):
    """A DiT-like class-conditional folder: out = 0.3 x + 0.05 label + 1e-4 t (C = 1, 8x8)."""
    _save(tmp / "model.onnx",
          [helper.make_node("Mul", ["hidden_states", "a"], ["p"]),
           helper.make_node("Cast", ["class_labels"], ["cf"], to=TensorProto.FLOAT),
           helper.make_node("Mul", ["cf", "b"], ["q"]), helper.make_node("Mul", ["timestep", "c"], ["r"]),
           helper.make_node("Add", ["q", "r"], ["qr"]), helper.make_node("Reshape", ["qr", "shape"], ["qr4"]),
           helper.make_node("Add", ["p", "qr4"], ["sample"])],
          [_f("hidden_states", [1, 1, 8, 8]), _f("timestep", [1]), _f("class_labels", [1], TensorProto.INT32)],
          [_f("sample", [1, 1, 8, 8])],
          [_const("a", 0.3), _const("b", 0.05), _const("c", 1e-4),
           numpy_helper.from_array(np.asarray([1, 1, 1, 1], np.int64), "shape")])
    manifest = {"kind": "image", "conditioning": "label", "label": {"input": "class_labels", "num_classes": 10, "null": 10},
                "sampler": {"name": "ddim", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "beta_schedule": "linear", "steps": 5, "guidance": 2.0},
                "latent": {"shape": [1, 1, 8, 8], "scaling_factor": 1.0},
                "transformer_io": {"latent": "hidden_states", "timestep": "timestep", "output": "sample"},
                "components": {"transformer": {"onnx": "model.onnx", "context": "model_ctx.onnx"}}}
    (tmp / "pipeline.json").write_text(json.dumps(manifest))
    return tmp


def _text_folder(tmp):
    """A text folder: encoder = table[ids] * mask; transformer out = 0.5 x + 0.01 sum(emb * mask);
    decoder = tanh(latent / 0.5 scaling); flow Euler sampler with shift 3."""
    table = np.random.default_rng(0).standard_normal((VOCAB, D)).astype(np.float32)
    for sub in ("text_encoder", "transformer", "vae_decoder", "tokenizer", "constants"):
        (tmp / sub).mkdir()
    _save(tmp / "text_encoder" / "model.onnx",
          [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
           helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["m"]),
           helper.make_node("Mul", ["e", "m"], ["last_hidden_state"])],
          [_f("input_ids", [1, L], TensorProto.INT64), _f("attention_mask", [1, L])], [_f("last_hidden_state", [1, L, D])],
          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.asarray([2], np.int64), "axis")])
    _save(tmp / "transformer" / "model.onnx",
          [helper.make_node("Unsqueeze", ["encoder_attention_mask", "axis"], ["m"]),
           helper.make_node("Mul", ["encoder_hidden_states", "m"], ["em"]),
           helper.make_node("ReduceSum", ["em"], ["s"], keepdims=0),
           helper.make_node("Mul", ["s", "k"], ["sk"]), helper.make_node("Mul", ["hidden_states", "h"], ["hx"]),
           helper.make_node("Add", ["hx", "sk"], ["sample"])],
          [_f("hidden_states", [1, 3, 4, 4]), _f("timestep", [1]), _f("encoder_hidden_states", [1, L, D]),
           _f("encoder_attention_mask", [1, L])], [_f("sample", [1, 3, 4, 4])],
          [_const("k", 0.01), _const("h", 0.5), numpy_helper.from_array(np.asarray([2], np.int64), "axis")])
    _save(tmp / "vae_decoder" / "model.onnx", [helper.make_node("Tanh", ["latent"], ["sample"])],
          [_f("latent", [1, 3, 4, 4])], [_f("sample", [1, 3, 4, 4])])
    shutil.copy(TOKENIZER, tmp / "tokenizer" / "tokenizer.json")
    null_mask = np.zeros((1, L), np.float32)
    null_mask[0, 0] = 1  # the empty prompt is <bos>
    np.save(tmp / "constants" / "uncond_embedding.npy", table[[2] + [0] * (L - 1)][None] * null_mask[..., None])
    np.save(tmp / "constants" / "uncond_mask.npy", null_mask)
    comp = lambda sub: {"onnx": f"{sub}/model.onnx", "context": f"{sub}/model_ctx.onnx"}  # noqa: E731
    manifest = {"kind": "image", "conditioning": "text",
                "text": {"tokenizer": "tokenizer/tokenizer.json", "length": L, "pad_id": 0, "lowercase": True,
                         "ids_input": "input_ids",
                         "mask_input": "attention_mask", "output": "last_hidden_state",
                         "uncond_embedding": "constants/uncond_embedding.npy", "uncond_mask": "constants/uncond_mask.npy"},
                "sampler": {"name": "flow_euler", "num_train_timesteps": 1000, "shift": 3.0, "timesteps_per_sigma": 1000.0,
                            "steps": 4, "guidance": 3.0},
                "latent": {"shape": [1, 3, 4, 4], "scaling_factor": 0.5},
                "transformer_io": {"latent": "hidden_states", "timestep": "timestep", "output": "sample",
                                   "text": "encoder_hidden_states", "text_mask": "encoder_attention_mask"},
                "vae_io": {"latent": "latent", "output": "sample"},
                "components": {k: comp(k) for k in ("text_encoder", "transformer", "vae_decoder")}}
    (tmp / "pipeline.json").write_text(json.dumps(manifest))
    return tmp, table


def test_label_folder_samples_as_the_jax_ddim_sampler(tmp_path, capsys):
    import jax.numpy as jnp

    from fraqat_jax.diffusion import ddim_sample

    folder = _label_folder(tmp_path)
    out = tmp_path / "img.png"
    got = deploy.main([str(folder), "--label", "7", "--out", str(out), "--provider", "cpu", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "step:" in printed and "transformer:" in printed and "10 calls" in printed  # 5 steps x 2 with guidance
    noise = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    fn = lambda x, t, c: 0.3 * x + 0.05 * c["class_labels"].astype(jnp.float32)[:, None, None, None] + 1e-4 * t[:, None, None, None]  # noqa: E731
    ref = ddim_sample(fn, jnp.asarray(noise), {"class_labels": jnp.asarray([7])}, num_steps=5, guidance_scale=2.0,
                      null_cond={"class_labels": jnp.asarray(10)})
    np.testing.assert_allclose(got, np.asarray(ref)[0], rtol=1e-5, atol=1e-5)
    pixels = np.asarray(PIL.open(out))
    assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.clip(np.round((np.asarray(ref, np.float64)[0, 0] + 1) / 2 * 255), 0, 255))


def test_text_folder_samples_as_the_jax_euler_sampler(tmp_path):
    import jax.numpy as jnp
    from tokenizers import Tokenizer

    from fraqat_jax.diffusion import euler_sample

    folder, table = _text_folder(tmp_path)
    out = tmp_path / "img.png"
    got = deploy.main([str(folder), "--prompt", " A Digit 3 ", "--out", str(out), "--provider", "cpu", "--steps", "3"])
    ids = Tokenizer.from_file(TOKENIZER).encode("a digit 3").ids  # lower-cased and stripped first
    mask = (np.arange(L) < len(ids)).astype(np.float32)[None]
    emb = table[ids + [0] * (L - len(ids))][None] * mask[..., None]
    null = np.load(folder / "constants" / "uncond_embedding.npy")
    fn = lambda x, t, c: 0.5 * x + 0.01 * c.reshape(c.shape[0], -1).sum(1)[:, None, None, None]  # noqa: E731
    noise = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    lat = euler_sample(fn, jnp.asarray(noise), jnp.asarray(emb), num_steps=3, shift=3.0, guidance_scale=3.0,
                       null_cond=jnp.asarray(null[0]))
    np.testing.assert_allclose(got, np.tanh(np.asarray(lat)[0] / 0.5), rtol=1e-5, atol=1e-5)
    pixels = np.asarray(PIL.open(out))
    assert pixels.shape == (4, 4, 3)  # one RGB image, no border
    np.testing.assert_array_equal(pixels, np.clip(np.round((np.transpose(got, (1, 2, 0)) + 1) / 2 * 255), 0, 255))


def _run(args, env_path=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in (env_path, ROOT) if p]))
    return subprocess.run([sys.executable, "-m", "fraqat_jax.deploy", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_runs_where_jax_cannot_be_imported(tmp_path):
    folder, _ = _text_folder(tmp_path / "f" if (tmp_path / "f").mkdir() is None else None)
    fake = tmp_path / "nojax"
    (fake / "jax").mkdir(parents=True)
    (fake / "jax" / "__init__.py").write_text("raise ImportError('jax is not installed here')\n")
    (fake / "flax").mkdir()
    (fake / "flax" / "__init__.py").write_text("raise ImportError('flax is not installed here')\n")
    out = tmp_path / "img.png"
    r = _run([str(folder), "--prompt", "a digit", "--out", str(out), "--provider", "cpu"], str(fake))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "text_encoder:" in r.stdout and "vae_decoder:" in r.stdout
    check = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(fake)))
    assert check.returncode != 0 and "jax is not installed here" in check.stderr


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    folder, _ = _text_folder(tmp_path / "t" if (tmp_path / "t").mkdir() is None else None)
    labels = _label_folder(tmp_path / "l" if (tmp_path / "l").mkdir() is None else None)
    (tmp_path / "empty").mkdir()
    png = str(tmp_path / "x.png")
    cases = [
        ([str(tmp_path / "nope"), "--prompt", "a", "--out", png], "does not exist"),
        ([str(tmp_path / "empty"), "--prompt", "a", "--out", png], "not a pipeline folder"),
        ([str(folder), "--prompt", "a", "--out", png, "--steps", "0", "--provider", "cpu"], "--steps must be >= 1, got 0"),
        ([str(folder), "--prompt", "word " * (2 * L), "--out", png, "--provider", "cpu"], f"text length {L}"),
        ([str(folder), "--label", "3", "--out", png, "--provider", "cpu"], "--prompt"),
        ([str(labels), "--label", "10", "--out", png, "--provider", "cpu"], "--label must be in [0, 9], got 10"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            deploy.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, (argv, err)
    manifest = json.loads((folder / "pipeline.json").read_text())
    alone = dict(manifest, components={"transformer": manifest["components"]["transformer"]})
    del alone["text"]  # a text-conditional transformer exported alone
    (folder / "pipeline.json").write_text(json.dumps(alone))
    with pytest.raises(SystemExit) as e:
        deploy.main([str(folder), "--prompt", "a", "--out", png, "--provider", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "text_encoder" in err and "missing" in err and err.count("\n") == 1
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    os.remove(folder / "vae_decoder" / "model.onnx")
    with pytest.raises(SystemExit) as e:
        deploy.main([str(folder), "--prompt", "a", "--out", png, "--provider", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "vae_decoder" in err and "missing" in err
    # --provider qnn without the plugin: a package onnxruntime_qnn that fails to import.
    fake = tmp_path / "noqnn" / "onnxruntime_qnn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named onnxruntime_qnn')\n")
    r = _run([str(labels), "--label", "1", "--out", png, "--provider", "qnn"], str(fake.parent))
    assert r.returncode == 2 and "onnxruntime-qnn" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_dpm_solver_matches_diffusers_on_flow_sigmas():
    """The multistep DPM-Solver++ (2nd order, flow sigmas) against diffusers' scheduler on the same
    model function."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    steps = 6
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=3.0, solver_order=2, algorithm_type="dpmsolver++")
    sched.set_timesteps(steps)
    ours_t, update = deploy_image.step_fn({"name": "flow_dpmsolver++", "shift": 3.0, "num_train_timesteps": 1000,
                                           "timesteps_per_sigma": 1000.0}, steps)
    x0 = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    fn = lambda x, t: 0.4 * x + 1e-3 * t  # noqa: E731
    x, y = x0.copy(), torch.from_numpy(x0.copy())
    for i, t in enumerate(sched.timesteps):
        np.testing.assert_allclose(ours_t[i], float(t), rtol=1e-4)
        y = sched.step(fn(y, float(t)), t, y).prev_sample
        x = update(i, x, fn(x, ours_t[i]))
    np.testing.assert_allclose(x, y.numpy(), rtol=1e-4, atol=1e-5)
