"""The evaluation of a trained student (``python -m fraqat_jax.eval``) against independent sums."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fraqat_jax import train
from fraqat_jax.eval import __main__ as eval_cli
from fraqat_jax.diffusion import samplers
from fraqat_jax.eval.classifier import DigitsClassifier
from fraqat_jax.eval.fid import frechet_distance_from_features

from eval_shared import NUM_SAMPLES, NUM_VAL, STEPS, TARGET_BITS, trained_run


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


def test_eval_json_matches_an_independent_computation(run_dir):
    n, steps = NUM_SAMPLES, 20  # the settings of the shared comparison: its compilations are reused
    got = eval_cli.main(["--workdir", run_dir, "--num-samples", str(n), "--num-val", str(NUM_VAL)])
    saved = json.loads(open(f"{run_dir}/eval.json").read())  # checked below against the sums from scratch
    assert saved["step"] == STEPS and saved["bits"] == TARGET_BITS and saved["fd_features"] == "digits_classifier"
    # the same numbers from scratch: same noise for teacher and student, DDIM, first channel (epsilon)
    teacher, student, _ = train.load_run(run_dir)
    noise, key = samplers.make_noise(0, (n, 1, 8, 8))
    labels = jnp.arange(n) % 10

    def draw(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state):
            m = nnx.merge(graphdef, state)
            fn = lambda x, t, c: m(hidden_states=x, timestep=t, class_labels=c)  # noqa: E731
            return samplers.ddim_sample(fn, noise, labels, num_steps=steps)

        return np.asarray(run(state), np.float64)

    t_s, s_s = draw(teacher), draw(student)
    mse = np.mean((s_s - t_s) ** 2)
    clf = DigitsClassifier.load()
    fd = frechet_distance_from_features(clf.features(np.clip(s_s, -1, 1)), clf.features(np.clip(t_s, -1, 1)))
    accuracy = np.mean(clf.predict(np.clip(s_s, -1, 1)) == np.asarray(labels))
    for result in (got, saved):  # what the command returns and what it wrote
        assert result["mse"] == pytest.approx(mse, rel=1e-4)
        assert result["psnr"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-4)
        assert result["fd"] == pytest.approx(fd, rel=1e-3, abs=1e-6)
        assert result["accuracy"] == pytest.approx(accuracy)
        assert result["val_loss"] > 0 and result["teacher_accuracy"] is not None


def test_validation_loss_is_zero_for_the_teacher_and_grows_as_bits_fall(run_dir):
    from fraqat_jax.eval.evaluate import Evaluator
    from fraqat_jax.nn import set_bits

    teacher, student, cfg = train.load_run(run_dir)
    ev = Evaluator(teacher, cfg, num_samples=NUM_SAMPLES, num_val=NUM_VAL)  # compiled above
    assert ev.val_loss(teacher) == 0.0
    losses = []
    for bits in (8.0, 4.0, 2.0):
        set_bits(student, bits)
        losses.append(ev.val_loss(student))
    assert 0 < losses[0] < losses[1] < losses[2]


def test_bad_workdir_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--workdir", str(tmp_path)])
    assert e.value.code == 2 and "no trained student" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--workdir", str(tmp_path / "nope")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
