"""Whole runs: resume equality, SIGTERM, outputs, bad inputs, two processes (1 vs 8 devices: test_robust)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fraqat_jax import schedules
from fraqat_jax.train import load_run, run
from fraqat_jax.train.__main__ import main


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_gives_identical_losses_and_bits(base, tmp_path):
    cfg = {**base, "steps": 12}
    full = str(tmp_path / "full")
    run(cfg, workdir=full)
    rows = _rows(full)
    assert [r["step"] for r in rows] == list(range(1, 13))
    np.testing.assert_array_equal([r["bits"] for r in rows], schedules.by_name("fraqat", 12).values())
    # A run that crashed after update 7: its last checkpoint is step 5, metrics went to step 7.
    crashed = str(tmp_path / "crashed")
    shutil.copytree(full, crashed)
    for d in os.listdir(os.path.join(crashed, "checkpoints")):
        if d.isdigit() and int(d) > 5:
            shutil.rmtree(os.path.join(crashed, "checkpoints", d))
    with open(os.path.join(crashed, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:7])
    result = run(cfg, workdir=crashed)
    assert result.status == "completed" and result.steps == 12
    resumed = _rows(crashed)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # history kept, no duplicates
    for a, b in zip(rows, resumed):
        assert a["bits"] == b["bits"] and a["loss"] == b["loss"], (a, b)
    # load_run rebuilds the student at its final bit-width and the frozen teacher.
    teacher, student, loaded_cfg = load_run(full)
    from fraqat_jax import nn as fq_nn

    assert set(fq_nn.bits_of(student).values()) == {4.0}
    assert loaded_cfg.steps == 12


def test_outputs_grids_summary_and_ema(base, tmp_path):
    workdir = str(tmp_path / "w")
    result = run({**base, "steps": 12, "sample_grids": True, "num_samples": 4, "sample_steps": 2,
                  "ema_decay": 0.9, "log_every": 4}, workdir=workdir)
    assert result.compilations == 1
    pngs = sorted(os.listdir(os.path.join(workdir, "samples")))
    bits = schedules.by_name("fraqat", 12).values()
    ends = [i + 1 for i in range(12) if i == 11 or bits[i + 1] != bits[i]]  # last step of each stage
    assert pngs == [f"step_{s:06d}_bits_{bits[s - 1]:g}.png" for s in ends]
    assert [r["step"] for r in _rows(workdir)] == [4, 8, 12]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["steps"] == 12
    _, ema_student, _ = load_run(workdir, ema=True)
    _, student, _ = load_run(workdir)
    from flax import nnx

    a = nnx.to_flat_state(nnx.state(ema_student, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(student, nnx.Param)))
    assert any(not np.allclose(v.get_value(), b[k].get_value()) for k, v in a)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_resumes(base, tmp_path, cli, sub_env):
    args = [f"--set={k}={v}" for k, v in {**base, "steps": 400, "checkpoint_every": 1000}.items()]
    ref = str(tmp_path / "ref")
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen([sys.executable, "-m", "fraqat_jax.train", "--workdir", workdir, *args],
                            env=sub_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in out
    stopped = _rows(workdir)[-1]["step"]
    assert 3 <= stopped < 400
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    r = cli(["--workdir", workdir, *args])
    assert r.returncode == 0, r.stderr
    # Reference without interruption (in this process).
    run({**base, "steps": 400, "checkpoint_every": 1000}, workdir=ref)
    a, b = _rows(ref), _rows(workdir)
    assert [x["step"] for x in b] == list(range(1, 401))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["bits"] for x in a] == [x["bits"] for x in b]


@pytest.mark.parametrize("argv, needle", [
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--schedule", "quadratic"], "schedule='quadratic' is not allowed"),
    (["--mesh", "data=3"], "--mesh 'data=3' has 3 devices but there are 1"),
    (["--mesh", "pipeline=1"], "unknown mesh axis 'pipeline'"),
    (["--set", "teacher=/no/such/teacher"], "teacher='/no/such/teacher' does not exist"),
    (["--config", "/no/such/config.py"], "config file '/no/such/config.py' does not exist"),
    (["--steps", "0"], "steps=0 is not allowed"),
    (["--set", "batch_size=many"], "batch_size='many' is not allowed"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, tmp_path, capsys):
    code = main([*argv, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_config_file_with_error_and_cli_exit_status(tmp_path, cli):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'steps': 1 / 0}\n")
    r = cli(["--config", str(bad), "--workdir", str(tmp_path / "w")])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "has an error: ZeroDivisionError" in r.stderr
    assert "Traceback" not in r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together(base, tmp_path, sub_env):
    ref = run({**base, "steps": 6}, workdir=str(tmp_path / "one"))
    port = _free_port()
    workdir = str(tmp_path / "two")
    args = ["--workdir", workdir, *[f"--set={k}={v}" for k, v in {**base, "steps": 6}.items()]]
    procs = []
    for pid in range(2):
        env = {**sub_env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-m", "fraqat_jax.train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    two = np.asarray([r["loss"] for r in _rows(workdir)])
    np.testing.assert_allclose(two, [m["loss"] for m in ref.metrics], rtol=1e-4)


def test_tfds_mock_and_datafree_runs(base, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        r = run({**base, "steps": 12, "data": "tfds:mnist"}, workdir=str(tmp_path / "tfds"))
    assert r.status == "completed" and [m["data_position"] for m in r.metrics] == list(range(1, 13))
    assert all(np.isfinite(m["loss"]) for m in r.metrics)
    r = run({**base, "steps": 12, "data": "datafree", "sample_steps": 2}, workdir=str(tmp_path / "datafree"))
    assert r.status == "completed" and all(np.isfinite(m["loss"]) for m in r.metrics)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base, tmp_path, capsys):
    from fraqat_jax.train.loop import TrainingDiverged

    workdir = str(tmp_path / "w")
    # An absurd learning rate: update 1 (loss finite) throws the weights to ~1e30, update 2 is inf/NaN.
    with pytest.raises(TrainingDiverged, match="last good checkpoint kept"):
        run({**base, "steps": 6, "lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0, "checkpoint_every": 1},
            workdir=workdir)
    out = capsys.readouterr().out
    assert "stopping" in out and "step 2" in out
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
    assert [r["step"] for r in _rows(workdir)] == [1]
    assert np.isfinite(_rows(workdir)[0]["loss"])
