"""A seventh model joins with a family object of its own and no edit elsewhere: a toy family (a
two-layer perceptron that regresses noisy vectors), registered from this test, is trained by
``fraqat_jax.train.run``, evaluated by ``python -m fraqat_jax.eval``'s ``main`` and exported to
orbax by ``python -m fraqat_jax.export``'s ``main``; each result is checked against a numpy
recomputation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fraqat_jax import data, export, family, runs, train
from fraqat_jax.eval import __main__ as eval_cli
from fraqat_jax.export import __main__ as export_cli
from fraqat_jax.data.streams import stream
from fraqat_jax.family.settings import ConfigError, number_in, setting

WIDTH, FEATURES = 16, 4


class ToyPerceptron(nnx.Module):
    """``y = W2 gelu(W1 x + b1) + b2``, built from a config dict like every port."""

    def __init__(self, config, *, rngs, dtype=None, param_dtype=jnp.float32, **unused):
        self.config = dict(config)
        f, w = int(config["features"]), int(config["width"])
        self.fc1 = nnx.Linear(f, w, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = nnx.Linear(w, f, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    #: std of the noise added to each training vector
    input_noise: float = setting(0.25, "toy: std of the noise added to each training vector", number_in(0.0, 10.0))


class Toy(family.Family):
    name = "toy"
    model_classes = ("ToyPerceptron",)
    Config = ToyConfig

    def teacher_class(self, teacher):
        return "ToyPerceptron" if teacher.startswith("toy:") else None

    def teacher_spec(self, cfg):
        return ToyPerceptron, {"features": FEATURES, "width": WIDTH}

    def teacher_builder(self, cfg):
        cls, config = self.teacher_spec(cfg)
        return lambda: cls(config, rngs=nnx.Rngs(int(cfg.teacher.split(":")[1])))

    def load_teacher(self, cfg):
        return self.teacher_builder(cfg)()

    def port(self, class_name):
        return ToyPerceptron

    def validate_config(self, cfg):
        if cfg.data != "toy":
            raise ConfigError(f"data={cfg.data!r} is not allowed for a toy teacher: use toy")

    def make_source(self, cfg, model_config, sample_teacher=None, *, seed=None):
        x = np.random.default_rng(7).normal(size=(256, FEATURES)).astype(np.float32)
        return data.ArraySource({"x": x}, seed=cfg.seed if seed is None else seed)

    def training_inputs(self, key, batch, cfg):
        x = jnp.asarray(batch["x"])
        return {"x": x + float(cfg.input_noise) * jax.random.normal(key, x.shape)}

    def apply(self, model, inputs):
        return model(inputs["x"])

    def loss(self, student_out, teacher_out, inputs):
        return jnp.mean(jnp.square(student_out.astype(jnp.float32) - teacher_out.astype(jnp.float32)))

    def heldout_inputs(self, cfg, model_config, rows, key, num, sample_teacher=None):
        return self.training_inputs(key, {"x": np.asarray(rows["x"])[:num]}, cfg)

    def example_batch(self, model_config, **size):
        return {"x": ((FEATURES,), "float32")}


@pytest.fixture
def toy():
    fam = family.register(Toy())
    yield fam
    family.unregister("toy")


def test_a_toy_family_trains_evaluates_and_exports(toy, tmp_path):
    assert family.family_for_teacher("toy:3") is toy
    with pytest.raises(ConfigError, match="unknown config key 'seq_len'.*toy run"):
        train.load_config(None, ["teacher=toy:3", "data=toy", "seq_len=8"])
    cfg = train.load_config(None, ["teacher=toy:3", "data=toy", "steps=12", "batch_size=16", "log_every=4",
                                   "checkpoint_every=12", "progress=none", "lr=3e-3", "warmup_steps=0",
                                   "input_noise=0.5"])
    assert "input_noise" in cfg and "image_size" not in cfg and "seq_len" not in cfg

    workdir = str(tmp_path / "run")
    result = train.run(cfg, workdir=workdir)
    assert result.status == "completed" and result.steps == 12
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    bits = [r["bits"] for r in result.metrics if "bits" in r]
    assert len(losses) == 3 and all(np.isfinite(losses)) and min(losses) > 0
    assert bits[0] > bits[-1] == result.final_bits == 4.0  # the FraQAT schedule went down to 4 bits
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["input_noise"] == 0.5 and "sample_steps" not in saved and "sample_tokens" not in saved

    # evaluation through the command's main: the validation loss is the MSE of the student against
    # the teacher on the family's held-out inputs (its rows and key from the evaluator's validation stream)
    out = eval_cli.main(["--workdir", workdir, "--num-samples", "2", "--num-val", "32"])
    teacher, student, run_cfg = runs.load_run(workdir)
    val = stream(int(run_cfg.seed), "validation")
    rows = toy.make_source(run_cfg, teacher.config, seed=val).batch(0, 32)
    held = toy.heldout_inputs(run_cfg, teacher.config, rows, jax.random.key(val), 32)
    ref = np.mean((np.asarray(student(held["x"]), np.float64) - np.asarray(teacher(held["x"]), np.float64)) ** 2)
    assert out["val_loss"] > 0 and out["val_loss"] == pytest.approx(float(ref), rel=1e-4)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["val_loss"] == out["val_loss"]

    # export to orbax through the command's main, then load: the frozen model computes like the student
    export_cli.main(["--workdir", workdir, "--out", str(tmp_path / "exported")])
    meta = export.load_metadata(str(tmp_path / "exported"))
    assert meta["family"] == "toy" and meta["model_class"] == "ToyPerceptron"
    loaded = export.load(str(tmp_path / "exported"))
    x = np.random.default_rng(1).normal(size=(8, FEATURES)).astype(np.float32)
    want, got = np.asarray(student(x)), np.asarray(loaded(x))
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)
