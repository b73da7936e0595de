"""Under ``CI=true`` a skip for lack of a module that CI installs is a failure naming the module
(tests/conftest.py), at collection and inside a test; modules of extras CI leaves out still skip."""

import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _write(tmp_path) -> None:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_module_level.py").write_text('import pytest\npytest.importorskip("onnx.not_a_module_x")\n')
    (tmp_path / "test_inside.py").write_text(
        "import pytest\n\n\ndef test_installed():\n    pytest.importorskip('scipy.not_a_module_y')\n\n\n"
        "def test_optional():\n    pytest.importorskip('lm_eval_not_installed_z')\n")


def _pytest(tmp_path, ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ci_turns_skips_for_ci_modules_into_failures(tmp_path):
    _write(tmp_path)
    out = _pytest(tmp_path, "true")
    assert out.returncode != 0, out.stdout
    assert "CI installs 'onnx.not_a_module_x'" in out.stdout, out.stdout


def test_outside_ci_they_skip(tmp_path):
    _write(tmp_path)
    out = _pytest(tmp_path, "")
    assert out.returncode == 0 and "3 skipped" in out.stdout, out.stdout


def test_ci_fails_a_skip_inside_a_test(tmp_path):
    _write(tmp_path)
    (tmp_path / "test_module_level.py").unlink()
    out = _pytest(tmp_path, "true")
    assert out.returncode == 1 and "1 failed, 1 skipped" in out.stdout, out.stdout
    assert "CI installs 'scipy.not_a_module_y'" in out.stdout, out.stdout


def test_ci_fails_a_skip_marker_that_names_a_ci_module(tmp_path):
    """test_plan's libtpu marker says 'libtpu is not installed': under CI that is a failure too."""
    (tmp_path / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (tmp_path / "test_marker.py").write_text(
        "import pytest\n\n\n@pytest.mark.skipif(True, reason=\"libtpu is not installed (pip install 'fraqat_jax[tpu]')\")\n"
        "def test_tpu():\n    pass\n\n\n@pytest.mark.skipif(True, reason='tensorflow is not installed')\ndef test_tf():\n    pass\n")
    out = _pytest(tmp_path, "true")
    # a marker skips at setup, so pytest reports the failure as an error of the setup phase
    assert out.returncode == 1 and "1 skipped, 1 error" in out.stdout, out.stdout
    assert "CI installs 'libtpu'" in out.stdout, out.stdout
