"""The comparison CLI on a tiny teacher: every method trained on equal terms, outputs consistent."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fraqat_jax import compare, schedules

TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 2, "num_layers": 1,
        "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10}


def tiny_teacher(directory):
    """A 1-block DiT with random weights everywhere (adaLN-Zero's zeros would make outputs trivial)."""
    from fraqat_jax.models import DiTTransformer2DModel
    from fraqat_jax.train.models import save_builtin_teacher

    model = DiTTransformer2DModel(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = v[...].shape
        v[...] = jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0] if len(shape) > 1 else 8), jnp.float32)
    return save_builtin_teacher(model, str(directory))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    teacher = tiny_teacher(tmp_path_factory.mktemp("teacher"))
    workdir = tmp_path_factory.mktemp("compare")
    rows = compare.main([
        "--workdir", str(workdir), "--steps", "6", "--seeds", "2", "--methods", "ptq,fraqat",
        "--eval-points", "2", "--num-samples", "24", "--num-val", "16", "--target-bits", "3",
        "--set", f"teacher={teacher}", "--set", "batch_size=16", "--set", "warmup_steps=1",
    ])
    return workdir, rows


def test_outputs_hold_every_method_with_means_over_seeds(result):
    workdir, rows = result
    saved = json.loads((workdir / "compare.json").read_text())
    assert [r["method"] for r in saved] == ["ptq", "fraqat"] == [r["method"] for r in rows]
    for r in saved:
        assert r["final_bits"] == 3.0
        for k in ("val_loss", "fd", "mse", "psnr", "accuracy"):
            per = np.asarray(r["per_seed"][k], np.float64)
            assert len(per) == 2
            assert r[k] == pytest.approx(per.mean())
            assert r[f"{k}_std"] == pytest.approx(per.std(ddof=1), abs=1e-12)
    trained = [r for r in saved if r["method"] != "ptq"]
    assert len(trained) == 1
    for r in trained:
        assert r["curve"]["step"] == [3, 6]
        assert r["curve"]["val_loss"][-1] == pytest.approx(r["val_loss"])
    # the two seeds really are different runs
    assert trained[0]["per_seed"]["val_loss"][0] != trained[0]["per_seed"]["val_loss"][1]
    md = (workdir / "compare.md").read_text()
    assert "| fraqat | 3 |" in md and "6 steps, 2 seeds" in md
    assert (workdir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_run_trained_with_its_schedule(result):
    workdir, _ = result
    assert compare.SCHEDULE_OF["qat"] == "constant"  # vanilla QAT: the target bits throughout
    for method, name in (("fraqat", "fraqat"),):
        want = schedules.by_name(name, 6, target_bits=3.0).values(6)
        for seed in (0, 1):
            run = workdir / method / f"seed_{seed}"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            np.testing.assert_allclose([r["bits"] for r in rows], want[[r["step"] - 1 for r in rows]])
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["seed"] == 1234 + seed and cfg["steps"] == 6 and cfg["target_bits"] == 3.0


def test_bad_input_exits_2(tmp_path, capsys):
    for argv, msg in ((["--methods", "ptq,gptq"], "unknown method 'gptq'"),
                      (["--seeds", "0"], "--seeds=0"),
                      (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
                      (["--config", str(tmp_path / "missing.py")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            compare.main(["--workdir", str(tmp_path / "w"), *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
