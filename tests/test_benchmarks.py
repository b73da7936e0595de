"""The benchmark scripts keep working: one tiny-size run of benchmarks/gpu.sh --smoke (it runs
block.py, train_step.py and peers.py with --json and imports models.py), checked against the keys
the README and the GPU run rely on, and the integer-bit numerics of peers.py against a numpy
formula of both quantizers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _np_symmetric(w, divisor, n):
    """Per-column symmetric quantizer: scale = absmax / divisor, codes clipped to [-2^(n-1), 2^(n-1)-1]."""
    scale = np.abs(w).max(axis=0, keepdims=True) / divisor
    codes = np.clip(np.rint(w / scale), -(2 ** (n - 1)), 2 ** (n - 1) - 1)
    return codes, codes * scale


def test_integer_numerics_match_a_numpy_formula_of_both_quantizers():
    pytest.importorskip("qwix")
    peers = _load("peers")
    w = np.random.default_rng(3).standard_normal((96, 12)).astype(np.float32)
    for n in (4, 8):
        v = peers.integer_numerics(w, n)
        ours_codes, ours = _np_symmetric(w, 2 ** (n - 1) - 1, n)
        qwix_codes, theirs = _np_symmetric(w, 2 ** (n - 1) - 0.5, n)
        assert (v["fraqat"]["code_min"], v["fraqat"]["code_max"]) == (ours_codes.min(), ours_codes.max())
        assert (v["qwix"]["code_min"], v["qwix"]["code_max"]) == (qwix_codes.min(), qwix_codes.max())
        assert v["max_abs_diff"] == pytest.approx(np.abs(ours - theirs).max(), rel=1e-4, abs=1e-6)
        # At the matching fractional width fraqat is Qwix's quantizer: what still differs lies within
        # float32 rounding of a rounding boundary, a few elements one step apart at most.
        step = np.abs(w).max(axis=0).max() / (2 ** (n - 1) - 0.5)
        assert v["max_abs_diff_rescaled"] <= step * (1 + 1e-5)
        assert v["elements_differing_rescaled"] <= w.size // 100
        assert 2 ** (peers.matching_bits(n) - 1) - 1 == pytest.approx(2 ** (n - 1) - 0.5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_smoke_writes_one_json(tmp_path):
    pytest.importorskip("qwix")
    out = tmp_path / "gpu.json"
    env = dict(_env(), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True
    assert {"block", "train_step", "peers", "models"} <= set(r["parts"])
    assert all(p["exit"] == 0 for p in r["parts"].values()), r["parts"]
    _check_block(r["parts"]["block"]["result"])
    assert _finite_positive(r["parts"]["train_step"]["result"]["step_ratio"])
    assert r["parts"]["train_step"]["result"]["schedule"]["compiles"] == 1
    _check_peers(r["parts"]["peers"]["result"])


def _check_block(r):
    """``block.py --json``: step times and memory of both steps, and their ratios."""
    assert _finite_positive(r["step_ms"]["fp"]) and _finite_positive(r["step_ms"]["qat"])
    assert r["step_ratio"] == pytest.approx(r["step_ms"]["qat"] / r["step_ms"]["fp"])
    assert r["peak_bytes"]["fp"] > 0 and r["peak_bytes"]["qat"] > 0
    assert r["memory_ratio"] == pytest.approx(r["peak_bytes"]["qat"] / r["peak_bytes"]["fp"])
    # Same parameters and optimizer state in both steps; QAT adds bit-widths, activation ranges
    # and temporaries, never a second copy of every parameter and its Adam moments.
    assert 0.9 < r["memory_ratio"] < 1.5


def _check_peers(r):
    """The keys of ``peers.py --json`` that the issue names, with sensible values."""
    assert set(r["ratios"]) == {"mlp", "stack4x512"}
    assert set(r["step_ms"]) == set(r["ratios"])
    for model, ratios in r["ratios"].items():
        ms = r["step_ms"][model]
        assert set(ratios) == set(ms) == {"fp32", "fraqat", "qwix", "qwix_absmax", "qwix_minmax"}
        for form in ("fraqat", "qwix", "qwix_absmax", "qwix_minmax"):
            assert _finite_positive(ms[form]) and _finite_positive(ratios[form]), (model, form, ratios)
            # each form's step time over the float32 step's, measured in the same run
            assert ratios[form] == pytest.approx(ms[form] / ms["fp32"], rel=1e-9), (model, form)
    # Bits are data in fraqat: one compile for all nine stages; Qwix compiles once per integer width.
    assert r["compiles"] == {"fraqat": 1, "qwix": 5}
    assert r["schedule"]["qwix"]["fractional_bits"].startswith("rejected")
    for n, bits in (("int4", 4), ("int8", 8)):
        v = r["numerics"][n]
        assert (v["fraqat"]["code_min"], v["fraqat"]["code_max"]) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert (v["qwix"]["code_min"], v["qwix"]["code_max"]) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert v["fraqat"]["scale_divisor"] == pytest.approx(2 ** (bits - 1) - 1, rel=1e-5)
        assert v["qwix"]["scale_divisor"] == pytest.approx(2 ** (bits - 1) - 0.5, rel=1e-5)
        assert v["max_abs_diff"] > 0


def test_gpu_script_rejects_an_unknown_argument():
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu.sh"), "--bogus"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "--bogus" in proc.stderr


def _load_path(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_claim_gpu_smoke_writes_paired_per_seed_json(tmp_path):
    """benchmarks/claim_gpu.sh --smoke runs its two cells through the real comparison and writes the
    per-seed JSON that docs/claim_map.py pools (the keys the GPU call and the map rely on)."""
    out = tmp_path / "claim.json"
    proc = subprocess.run(["bash", os.path.join(BENCH, "claim_gpu.sh"), "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "runs")], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "host", "smoke", "budget_seconds", "parallel", "cells", "unfinished", "seconds"):
        assert key in result, key
    assert result["smoke"] is True and result["unfinished"] == []
    assert set(result["cells"]) == {"paper", "continuous"}
    for name, cell in result["cells"].items():
        assert set(cell) >= {"what", "args", "methods", "seeds_wanted", "seeds", "stats"}
        assert list(cell["seeds"]) == ["1234"]
        per_method = cell["seeds"]["1234"]
        assert set(per_method) == set(cell["methods"])
        for m, v in per_method.items():
            assert _finite_positive(v["val_loss"]) and _finite_positive(v["fd"])
            if m != "ptq":
                assert v["diagnostics"]["ptq_val_loss"] > 0
        other = next(m for m in cell["methods"] if m not in ("qat", "ptq"))
        st = cell["stats"][other]
        ratio = per_method[other]["val_loss"] / per_method["qat"]["val_loss"]
        assert st["seeds"] == [1234] and st["val_loss_ratio"] == pytest.approx(ratio, rel=1e-9)
        assert st["val_loss_ratio_ci"] is None and st["verdict"] == "tie"  # one seed: no interval


def test_claim_map_pools_seed_files_with_a_paired_t_interval(tmp_path):
    """docs/claim_map.py --json pools the seeds of a cell across files (per device) and recomputes
    the paired-t interval: checked against scipy on the pooled per-seed ratios."""
    from scipy import stats

    rng = np.random.default_rng(0)
    files = []
    vals = {}
    for part, seeds in enumerate(([1234, 1235, 1236], [1237, 1238])):
        cell = {"seeds": {}}
        for s in seeds:
            q, f = rng.uniform(1e-3, 2e-3), rng.uniform(1e-3, 2e-3)
            vals[s] = f / q
            cell["seeds"][str(s)] = {m: {"val_loss": v, "fd": 1.0, "diagnostics": {"first_target_vs_ptq": 0.8}}
                                     for m, v in (("qat", q), ("fraqat", f))}
        path = tmp_path / f"p{part}.json"
        path.write_text(json.dumps({"device": "cpu test", "cells": {"paper": cell}}))
        files.append(str(path))
    claim_map = _load_path(os.path.join(ROOT, "docs", "claim_map.py"), "_claim_map")
    claim_map.main(["--json", *files, "--out", str(tmp_path), "--name", "m"])
    grid = json.loads((tmp_path / "m.json").read_text())
    st = grid["pooled"]["cpu test"]["paper"]["stats"]["fraqat"]
    r = np.array([vals[s] for s in sorted(vals)])
    lo, hi = stats.t.interval(0.95, len(r) - 1, loc=r.mean(), scale=stats.sem(r))
    assert st["seeds"] == sorted(vals)
    np.testing.assert_allclose([st["val_loss_ratio"], *st["val_loss_ratio_ci"]], [r.mean(), lo, hi], rtol=1e-9)
    assert st["better_on"] == int((r < 1).sum()) and st["first_target_vs_ptq_median"] == pytest.approx(0.8)
    assert (tmp_path / "m.png").stat().st_size > 0
