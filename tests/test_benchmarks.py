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
    for model, ratios in r["ratios"].items():
        assert ratios["fp32"] == pytest.approx(1.0)
        for form in ("fraqat", "qwix", "qwix_absmax", "qwix_minmax"):
            assert _finite_positive(ratios[form]), (model, form, ratios)
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
