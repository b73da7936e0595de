"""The comparison CLI on a tiny teacher: paired seeds, paired statistics checked against scipy,
diagnostics, a tiny grid and a tiny tuning run."""

import json

import numpy as np
import pytest
from eval_shared import tiny_compare, write_tiny_teacher
from scipy import stats

from fraqat_jax import compare, schedules


@pytest.fixture(scope="module")
def result():
    return tiny_compare()


def _paired_t(values, reference):
    """Independent reference: mean of per-seed ratios and scipy's 95% t interval."""
    r = np.asarray(values, np.float64) / np.asarray(reference, np.float64)
    lo, hi = stats.t.interval(0.95, len(r) - 1, loc=r.mean(), scale=stats.sem(r))
    return r.mean(), [lo, hi]


def test_outputs_hold_every_method_with_means_over_seeds(result):
    workdir, rows = result
    saved = json.loads((workdir / "compare.json").read_text())
    assert [r["method"] for r in saved] == ["ptq", "qat", "fraqat"] == [r["method"] for r in rows]
    for r in saved:
        assert r["final_bits"] == 3.0
        assert r["seeds"] == [1234, 1235]
        for k in ("val_loss", "fd", "mse", "psnr", "accuracy"):
            per = np.asarray(r["per_seed"][k], np.float64)
            assert len(per) == 2
            assert r[k] == pytest.approx(per.mean())
            assert r[f"{k}_std"] == pytest.approx(per.std(ddof=1), abs=1e-12)
    for r in saved[1:]:
        assert r["curve"]["step"] == [3, 6]
        assert r["curve"]["val_loss"][-1] == pytest.approx(r["val_loss"])
        # the two seeds really are different runs
        assert r["per_seed"]["val_loss"][0] != r["per_seed"]["val_loss"][1]
    md = (workdir / "compare.md").read_text()
    assert "| fraqat | 3 |" in md and "6 steps, 2 seeds" in md and "95% paired-t CI" in md
    assert (workdir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_ratios_and_cis_match_scipy(result):
    workdir, _ = result
    saved = {r["method"]: r for r in json.loads((workdir / "compare.json").read_text())}
    qat = saved["qat"]
    for name in ("ptq", "fraqat"):
        r = saved[name]
        for metric in ("val_loss", "fd"):
            mean, ci = _paired_t(r["per_seed"][metric], qat["per_seed"][metric])
            assert r[f"{metric}_ratio"] == pytest.approx(mean, rel=1e-12)
            np.testing.assert_allclose(r[f"{metric}_ratio_ci"], ci, rtol=1e-10)
            lo, hi = r[f"{metric}_ratio_ci"]
            want = "better" if hi < 1 else "worse" if lo > 1 else "tie"
            assert r["verdict" if metric == "val_loss" else "fd_verdict"] == want
        d = np.asarray(r["per_seed"]["val_loss"]) - np.asarray(qat["per_seed"]["val_loss"])
        assert r["val_loss_diff"] == pytest.approx(d.mean())
    assert saved["ptq"]["verdict"] == "worse"  # 6 steps of QAT already beat PTQ on both seeds
    # QAT is the reference row, and the ratios above were taken against another run's values
    assert qat["verdict"] == "reference" and qat["fd_verdict"] == "reference"
    assert saved["fraqat"]["per_seed"]["val_loss"] != qat["per_seed"]["val_loss"]


def test_each_run_trained_with_its_schedule_on_paired_seeds(result):
    workdir, _ = result
    assert compare.SCHEDULE_OF["qat"] == "constant"  # vanilla QAT: the target bits throughout
    for method, name in (("fraqat", "fraqat"), ("qat", "constant")):
        want = schedules.by_name(name, 6, target_bits=3.0).values(6)
        for seed in (0, 1):
            run = workdir / method / f"seed_{seed}"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            np.testing.assert_allclose([r["bits"] for r in rows], want[[r["step"] - 1 for r in rows]])
            cfg = json.loads((run / "config.json").read_text())
            assert cfg["seed"] == 1234 + seed and cfg["steps"] == 6 and cfg["target_bits"] == 3.0
    # pairing: both methods read the same data positions (the same batches) at every step
    q = [json.loads(x) for x in (workdir / "qat/seed_0/metrics.jsonl").read_text().splitlines()]
    f = [json.loads(x) for x in (workdir / "fraqat/seed_0/metrics.jsonl").read_text().splitlines()]
    assert [r["data_position"] for r in q] == [r["data_position"] for r in f] == list(range(1, 7))


def test_diagnostics(result):
    workdir, _ = result
    saved = {r["method"]: r for r in json.loads((workdir / "compare.json").read_text())}
    bits = schedules.by_name("fraqat", 6, target_bits=3.0).values(6)
    changes = [i + 1 for i in range(1, 6) if bits[i] != bits[i - 1]]  # 1-based step of the new width
    for s, d in enumerate(saved["fraqat"]["diagnostics"]):
        run = workdir / "fraqat" / f"seed_{s}"
        loss = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
        assert [c["step"] for c in d["bit_changes"]] == changes
        for c in d["bit_changes"]:
            assert c["jump"] == pytest.approx(loss[c["step"]] / loss[c["step"] - 1])
        first = int(np.argmax(bits == 3.0)) + 1
        assert d["first_target_step"] == first and d["first_target_loss"] == loss[first]
        assert d["first_target_vs_ptq"] == pytest.approx(loss[first] / saved["ptq"]["val_loss"])
        assert 0.0 < d["codes_changed"] < 1.0
    assert [c for d in saved["qat"]["diagnostics"] for c in d["bit_changes"]] == []


def test_code_change_share_counts_changed_codes():
    import tempfile

    from fraqat_jax.nn import quantized_layers
    from fraqat_jax.quant import quantize_codes
    from fraqat_jax.train import build_models

    teacher_dir = write_tiny_teacher(tempfile.mkdtemp())
    _, a = build_models({"teacher": teacher_dir})
    _, b = build_models({"teacher": teacher_dir})
    assert compare.code_change_share(a, b, 4.0) == 0.0
    layers = quantized_layers(b)
    _, layer = layers[0]
    k = layer.kernel[...]
    _, scale, _ = quantize_codes(k, 4.0)
    # move exactly one weight (not the max) by two grid steps: its code changes, no other does
    flat = np.argsort(np.abs(np.asarray(k)).ravel())[0]
    idx = np.unravel_index(flat, k.shape)
    layer.kernel[...] = k.at[idx].add(2.0 * float(scale.ravel()[0]))
    total = sum(lyr.kernel[...].size for _, lyr in layers)
    assert compare.code_change_share(a, b, 4.0) == pytest.approx(1 / total)


def test_grid_with_tuning_writes_cells_heatmap_and_picks_on_separate_seeds(tmp_path):
    # One cell, one method and one seed keep this cheap (each run costs a compile); the paired
    # statistics themselves are checked on the shared two-seed comparison above.
    teacher = write_tiny_teacher(tmp_path / "teacher")
    work = tmp_path / "grid"
    grid = compare.main([
        "--workdir", str(work), "--steps", "3", "--seeds", "1", "--methods", "ptq,qat", "--eval-points", "1",
        "--num-samples", "4", "--num-val", "8", "--grid", "target_bits=3", "--tune", "lr=1e-4,3e-2",
        "--tune-seeds", "1", "--set", f"teacher={teacher}", "--set", "batch_size=8", "--set", "warmup_steps=0",
    ])
    saved = json.loads((work / "grid.json").read_text())
    assert saved["axes"] == {"target_bits": ["3"]} and saved == json.loads(json.dumps(grid))
    (c,) = saved["cells"]
    assert c["point"] == {"target_bits": "3"}
    cell = work / "target_bits=3"
    rows = {r["method"]: r for r in json.loads((cell / "compare.json").read_text())}
    assert rows["qat"]["final_bits"] == 3.0
    for m in ("ptq", "qat"):
        for k in ("val_loss_ratio", "val_loss_ratio_ci", "fd_ratio", "fd_ratio_ci", "seeds"):
            assert c["methods"][m][k] == rows[m][k]
    ratio = rows["ptq"]["per_seed"]["val_loss"][0] / rows["qat"]["per_seed"]["val_loss"][0]
    assert rows["ptq"]["val_loss_ratio"] == pytest.approx(ratio) and rows["ptq"]["val_loss_ratio_ci"] is None
    assert rows["ptq"]["verdict"] == "tie"  # one seed: no CI, so no claim
    assert (work / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # tuning: the value with the lower mean val loss on the tuning seed, then fresh seeds
    tuned = rows["qat"]["tuned"]
    assert tuned["key"] == "lr" and set(tuned["scores"]) == {"0.0001", "0.03"}
    assert tuned["value"] == float(min(tuned["scores"], key=tuned["scores"].get))
    for v in ("0.0001", "0.03"):
        cfg = json.loads((cell / "tune" / "qat" / f"lr={v}" / "seed_0" / "config.json").read_text())
        assert cfg["seed"] == 1234 + compare.TUNE_SEED_OFFSET and cfg["lr"] == float(v)
    cfg = json.loads((cell / "qat" / "seed_0" / "config.json").read_text())
    assert cfg["seed"] == 1234 and cfg["lr"] == tuned["value"]


def test_bad_input_exits_2(tmp_path, capsys):
    for argv, msg in ((["--methods", "ptq,gptq"], "unknown method 'gptq'"),
                      (["--seeds", "0"], "--seeds=0"),
                      (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
                      (["--grid", "lr"], "--grid 'lr' is not allowed"),
                      (["--grid", "nonsense=1,2"], "unknown config key 'nonsense'"),
                      (["--grid", "lr=1e-3", "--grid", "lr=1e-4"], "given twice"),
                      (["--tune", "lr=abc"], "lr='abc' is not allowed"),
                      (["--config", str(tmp_path / "missing.py")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            compare.main(["--workdir", str(tmp_path / "w"), *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
