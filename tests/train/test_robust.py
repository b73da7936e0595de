"""Runs that survive: config drift on resume, kill -9 inside a save, unwritable workdirs, failed saves."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fraqat_jax.train import run
from fraqat_jax.train.__main__ import main
from fraqat_jax.train.loop import CheckpointWriteError


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(rows):
    return [r["step"] for r in rows if "event" not in r]


def _args(cfg):
    return [f"--set={k}={v}" for k, v in cfg.items()]


def test_resume_with_another_config_refuses_naming_each_key(base, tmp_path, capsys):
    cfg = {**base, "steps": 4}
    workdir = str(tmp_path / "w")
    run(cfg, workdir=workdir)
    before = _rows(workdir)
    code = main(["--workdir", workdir, *_args({**cfg, "lr": 0.01, "batch_size": 8})])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "lr: checkpoint 0.001, now 0.01" in err and "batch_size: checkpoint 16, now 8" in err
    assert _rows(workdir) == before  # nothing trained, nothing written

    # Safe keys (and more steps for a finished run) resume, and the change is recorded.
    code = main(["--workdir", workdir, *_args({**cfg, "steps": 6, "log_every": 2, "checkpoint_every": 3})])
    assert code == 0
    rows = _rows(workdir)
    events = [r for r in rows if r.get("event") == "config_changed"]
    assert len(events) == 1 and events[0]["step"] == 4
    assert events[0]["changes"]["steps"] == [4, 6] and events[0]["changes"]["log_every"] == [1, 2]
    assert _steps(rows) == [1, 2, 3, 4, 6]

    # --force-resume overrides, recorded the same way.
    code = main(["--workdir", workdir, "--force-resume", *_args({**cfg, "steps": 7, "lr": 0.002})])
    assert code == 0
    forced = [r for r in _rows(workdir) if r.get("event") == "force_resume"]
    assert len(forced) == 1 and forced[0]["changes"]["lr"] == [0.001, 0.002]


_CRASH_SCRIPT = """
import asyncio, json, os, sys, time
from orbax.checkpoint._src.path import atomicity
from fraqat_jax.train import run

original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    if self.get_final().name == os.environ["CRASH_AT_STEP"]:
        open(os.environ["CRASH_MARKER"], "w").close()  # the files are written, the rename is not done
        time.sleep(600)
    return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
run(json.loads(sys.argv[1]), workdir=sys.argv[2])
"""


@pytest.mark.slow
def test_kill_9_inside_a_save_resumes_from_the_last_complete_checkpoint(base, tmp_path, sub_env):
    cfg = {**base, "steps": 8, "checkpoint_every": 2, "log_every": 1}
    ref = run(cfg, workdir=str(tmp_path / "ref"))
    workdir = str(tmp_path / "w")
    marker = str(tmp_path / "in_save")
    env = {**sub_env, "CRASH_AT_STEP": "6", "CRASH_MARKER": marker}
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, json.dumps(cfg), workdir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), proc.communicate()[1][-3000:]
    proc.kill()  # SIGKILL in the middle of orbax's save of step 6
    proc.communicate()
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(".orbax-checkpoint-tmp" in n for n in names) and "6" not in names, names

    from fraqat_jax.train.report import Progress

    messages = []
    original = Progress.message
    Progress.message = lambda self, text: (messages.append(text), original(self, text))[1]
    try:
        result = run(cfg, workdir=workdir)
    finally:
        Progress.message = original
    assert result.status == "completed" and result.steps == 8
    assert any("incomplete checkpoint" in m for m in messages), messages
    assert any("resumed from" in m and "/4 " in m for m in messages), messages
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints")))
    rows = _rows(workdir)
    assert _steps(rows) == list(range(1, 9))  # no duplicate, no missing step
    assert [r["loss"] for r in rows] == [m["loss"] for m in ref.metrics]
    assert [r["bits"] for r in rows] == [m["bits"] for m in ref.metrics]


def test_torn_metrics_line_is_dropped_on_resume(base, tmp_path):
    cfg = {**base, "steps": 6, "checkpoint_every": 3}
    workdir = str(tmp_path / "w")
    full = run(cfg, workdir=workdir)
    # as if killed while writing row 5: checkpoint 3 is the newest, rows 1-4 and a torn fifth line
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    lines = open(os.path.join(workdir, "metrics.jsonl")).readlines()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(lines[:4])
        f.write(lines[4][:15])
    run(cfg, workdir=workdir)
    rows = _rows(workdir)
    assert _steps(rows) == list(range(1, 7))
    assert [r["loss"] for r in rows if "event" not in r] == [m["loss"] for m in full.metrics]


def test_unwritable_workdir_exits_2_before_training(base, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = main(["--workdir", str(blocker / "run"), *_args({**base, "steps": 2})])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is not writable" in err and str(blocker / "run") in err


def test_a_failed_save_keeps_the_previous_checkpoint(base, tmp_path, monkeypatch):
    from fraqat_jax.runs import checkpoint

    workdir = str(tmp_path / "w")
    original = checkpoint.Checkpointer.save

    def save(self, step, *args):
        if step == 4:
            raise OSError(28, "No space left on device")
        return original(self, step, *args)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint \\(step 2\\)"):
        run({**base, "steps": 6, "checkpoint_every": 2}, workdir=workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_a_vae_is_refused_as_teacher(tmp_path, capsys):
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "block_out_channels": [32], "layers_per_block": 1, "norm_num_groups": 32,
              "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps(config))
    code = main(["--workdir", str(tmp_path / "w"), "--set", f"teacher={vae}", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "AutoencoderKL" in err and "not supported" in err, err


@pytest.mark.slow
def test_pure_data_parallelism_reproduces_one_device_and_fsdp_agrees_statistically(base, tmp_path, sub_env):
    """data=8 sums the same per-example terms as one device: the first updates agree to float
    rounding. FSDP changes the order of the sums, which flips a few 4-bit rounding decisions that QAT
    then amplifies, so a FSDP run is only checked statistically: the mean loss of its last 10 of 30
    updates within 25% of the one-device run's."""
    env = {**sub_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    short, long = {**base, "steps": 3}, {**base, "steps": 30}
    # Both 8-device runs in one subprocess: JAX starts once.
    script = ("import json, sys; from fraqat_jax.train import run; "
              "cfgs = json.loads(sys.argv[1]); "
              "print('LOSSES', json.dumps([[m['loss'] for m in run(c, workdir=f'{sys.argv[2]}/{i}').metrics] "
              "for i, c in enumerate(cfgs)]))")
    r = subprocess.run([sys.executable, "-c", script, json.dumps([{**short, "mesh": "data=8"},
                                                                  {**long, "mesh": "data=4,fsdp=2"}]),
                        str(tmp_path / "eight")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LOSSES")][-1]
    data8, fsdp = (np.asarray(v) for v in json.loads(line[len("LOSSES "):]))

    one = [m["loss"] for m in run(short, workdir=str(tmp_path / "one_short")).metrics]
    np.testing.assert_allclose(data8, one, rtol=1e-5)
    one = np.asarray([m["loss"] for m in run(long, workdir=str(tmp_path / "one_long")).metrics])
    late_one, late_fsdp = one[-10:].mean(), fsdp[-10:].mean()
    assert abs(late_fsdp / late_one - 1) <= 0.25, (late_fsdp, late_one)
