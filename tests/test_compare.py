"""The comparison CLI on a tiny teacher: every method trained on equal terms, outputs consistent."""

import json

import numpy as np
import pytest

from fraqat_jax import compare, schedules

from eval_shared import tiny_compare


@pytest.fixture(scope="module")
def result():
    return tiny_compare()


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
