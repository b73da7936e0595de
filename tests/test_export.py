"""Export: the frozen W4A8 orbax checkpoint (load, agreement, size) and the diffusers layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fraqat_jax
from fraqat_jax import export, train
from fraqat_jax.diffusion import samplers

from eval_shared import trained_run


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


def inputs(n=6, seed=3):
    rng = np.random.default_rng(seed)
    return dict(hidden_states=jnp.asarray(rng.normal(size=(n, 1, 8, 8)), jnp.float32),
                timestep=jnp.asarray(rng.integers(0, 1000, n), jnp.float32),
                class_labels=jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def call(model, x):
    """The model's output on keyword inputs ``x``, jitted (eager NNX calls are slow)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, kw: nnx.merge(graphdef, st)(**kw))(state, x))


def test_orbax_export_loads_and_matches_fake_quant_student(run_dir, tmp_path, capsys):
    out = tmp_path / "w4a8"
    meta = export.main(["--workdir", run_dir, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "x the bf16 weights" in printed and "W3A8" in printed
    loaded = export.load(str(out))
    # reference: the trained student as train.load_run gives it (dynamic per-token activations)
    _, student, _ = train.load_run(run_dir)
    student_layers = dict(fraqat_jax.nn.quantized_layers(student))
    n_ranges = 0
    for path, node in nnx.iter_graph(loaded):
        name = ".".join(map(str, path))
        if name in student_layers and getattr(node, "act_range", None) is not None:
            lo, hi = np.asarray(node.act_range[...])
            assert np.isfinite([lo, hi]).all() and lo < hi  # calibrated for static runtimes
            assert node.act_granularity == student_layers[name].act_granularity == "token"  # served as trained
            n_ranges += 1
    assert n_ranges == len(student_layers)
    x = inputs()  # random DDPM inputs, as a new user would try
    ref, got = call(student, x), call(loaded, x)
    assert np.abs(got - ref).max() <= export.TOLERANCE * np.abs(ref).max()
    assert meta["max_rel_diff_vs_fake_quant"] <= export.TOLERANCE
    # the integer-matmul form of the same export: int32 accumulation, close but not bit for bit
    integer = call(export.load(str(out), integer=True), x)
    assert np.abs(integer - ref).max() <= 2e-2 * np.abs(ref).max()
    # the weights really are integer codes: 4-bit layers hold packed uint8 nibbles
    codes = [v for p, v in nnx.to_flat_state(nnx.state(loaded)) if p[-1] == "kernel_codes"]
    assert codes and all(c[...].dtype == jnp.uint8 for c in codes)
    assert export.load_metadata(str(out))["model_class"] == "DiTTransformer2DModel"
    # and the export samples like the port
    noise, key = samplers.make_noise(0, (4, 1, 8, 8))
    fn = lambda xx, t, c: loaded(hidden_states=xx, timestep=t, class_labels=c)  # noqa: E731
    s = jax.jit(lambda n: samplers.ddim_sample(fn, n, jnp.arange(4), num_steps=2))(noise)
    assert s.shape == (4, 1, 8, 8) and bool(jnp.isfinite(s).all())


def test_default_model_export_is_at_most_030_of_bf16():
    # 4-bit codes for every linear layer; biases, norms and embeddings stay in their float32 training
    # dtype (trained equals exported), which the tiny digits DiT's ratio feels: 0.285 measured.
    teacher, student = train.build_models(train.get_config())
    fraqat_jax.set_bits(student, 4.0)
    tree = export.orbax._stored_tree(fraqat_jax.freeze(student))
    stored = sum(x.nbytes for x in jax.tree.leaves(tree))
    bf16 = 2 * sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param)))
    assert stored / bf16 <= 0.30


def test_diffusers_export_round_trips(run_dir, tmp_path):
    from fraqat_jax.models import from_diffusers

    out = tmp_path / "hf"
    export.main(["--workdir", run_dir, "--out", str(out), "--format", "diffusers"])
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    loaded = from_diffusers(str(out))
    # reference: the teacher architecture holding bf16(fake_quantize(kernel)) and bf16 other weights
    _, student, _ = train.load_run(run_dir)
    bits = float(next(iter(fraqat_jax.nn.bits_of(student).values())))
    ref = nnx.clone(loaded)
    sflat = dict(nnx.to_flat_state(nnx.state(student, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(ref, nnx.Param)):
        value = sflat[path][...]
        if path[-1] == "kernel" and value.ndim == 2:  # every Linear is quantized by the paper's rules
            value = fraqat_jax.quantize(value, bits)
        var[...] = value.astype(jnp.bfloat16).astype(jnp.float32)
    x = inputs()
    graphdef, state = nnx.split(loaded)
    forward = jax.jit(lambda st: nnx.merge(graphdef, st)(**x))  # one compilation for both models
    got = np.asarray(forward(state))
    np.testing.assert_allclose(got, np.asarray(forward(nnx.state(ref))), rtol=1e-5, atol=1e-5)
    # and diffusers itself loads the folder and computes the same outputs
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    hf = diffusers.DiTTransformer2DModel.from_pretrained(str(out)).float().eval()
    with torch.no_grad():
        want = hf(torch.tensor(np.asarray(x["hidden_states"])), timestep=torch.tensor(np.asarray(x["timestep"])),
                  class_labels=torch.tensor(np.asarray(x["class_labels"])).long()).sample.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_errors_exit_2_with_a_clear_message(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "no trained student" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", run_dir, "--out", str(blocker / "sub")])
    assert e.value.code == 2 and "not a writable directory" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", run_dir, "--out", str(tmp_path / "busy")])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err
    with pytest.raises(export.ExportError, match="not a fraqat_jax export"):
        export.load(str(tmp_path / "busy"))


@pytest.mark.parametrize("act_ranges", ["dynamic", "static"])
def test_trained_equals_exported_on_training_inputs(act_ranges, tmp_path):
    """A student trained with dynamic or static activations exports as itself: on inputs drawn as
    training draws them, export.load agrees with train.load_run's student within 1e-4 x max|out|."""
    from eval_shared import write_tiny_teacher

    teacher_dir = write_tiny_teacher(tmp_path / "teacher")
    workdir = str(tmp_path / "run")
    train.run({"teacher": teacher_dir, "steps": 4, "batch_size": 16, "sample_grids": False, "progress": "none",
               "warmup_steps": 1, "act_ranges": act_ranges, "weight_granularity": "channel"}, workdir=workdir)
    teacher, student, cfg = train.load_run(workdir)
    layers = dict(fraqat_jax.nn.quantized_layers(student))
    if act_ranges == "static":  # the calibrated ranges travelled with the checkpoint, zero on the grid
        for layer in layers.values():
            lo, hi = np.asarray(layer.act_range[...], np.float64)
            zp = -lo / ((hi - lo) / 255)
            assert layer.act_ranges == "static" and abs(zp - round(zp)) < 1e-3
    out = tmp_path / "export"
    meta = export.main(["--workdir", workdir, "--out", str(out)])
    assert meta["act_ranges"] == act_ranges
    loaded = export.load(str(out))
    x_t, t, cond = export.calibration_batches(teacher, cfg, num_samples=8, batch_size=8, seed=5)[0]
    kw = dict(hidden_states=x_t, timestep=t, **cond)
    ref, got = call(student, kw), call(loaded, kw)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # per-channel weight scales survived the round trip
    assert all(np.asarray(node.kernel_scale[...]).size > 1 for _, node in nnx.iter_graph(loaded)
               if isinstance(node, fraqat_jax.nn.FrozenLinear))


def test_onnx_format_from_the_command_line(run_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "model.onnx"
    report = export.main(["--workdir", run_dir, "--out", str(out), "--format", "onnx"])
    printed = capsys.readouterr().out
    assert out.is_file() and "QDQ" in printed and "onnxruntime" in printed
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["hidden_states", "timestep", "class_labels"]
    assert [o.name for o in model.graph.output] == ["sample"]
    # static ranges (calibrated for this dynamically trained student): one activation code may land
    # a step apart between XLA's and onnxruntime's float arithmetic, hence 1e-2 and not the 1e-3 target
    assert 0 <= report["max_rel_diff"] <= 1e-2
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", run_dir, "--out", str(tmp_path), "--format", "onnx"])
    assert e.value.code == 2 and "writes one .onnx file" in capsys.readouterr().err
