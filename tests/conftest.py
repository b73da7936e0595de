"""Shared pytest set-up: JAX on the CPU, and one persistent compilation cache for the whole suite.

Many tests compile the same tiny models and train steps, in several processes (xdist workers and
the subprocesses of CLI tests, which inherit these variables). JAX's persistent cache keys an
executable by its program, options and JAX version, so a hit returns what compiling would.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fraqat_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import re  # noqa: E402

import pytest  # noqa: E402

#: Top-level modules that CI installs (the base dependencies and the extras in .ci/run: test, onnx,
#: qnn, tpu, peers, lm-eval). Under CI=true a skip for lack of one of them fails and names it, so a
#: broken install cannot drop tests quietly; modules of extras CI leaves out (tfds' tensorflow) may skip.
CI_INSTALLS = ("jax", "flax", "optax", "orbax", "numpy", "safetensors", "ml_dtypes", "tensorflow_datasets",
               "ml_collections", "rich", "matplotlib", "tensorboardX", "scipy", "pytest", "xdist", "filelock",
               "hypothesis", "torch", "diffusers", "transformers", "tokenizers", "onnx", "onnxruntime", "libtpu",
               "qwix", "onnxruntime_qnn", "lm_eval", "accelerate")
#: ``pytest.importorskip``'s wording, and ``NAME is not installed`` (the libtpu marker of test_plan)
_MISSING = re.compile(r"(?:could not import|No module named) '([^']+)'|\b([A-Za-z_][\w.]*) is not installed")


def _missing_ci_module(reason) -> str | None:
    """The CI-installed module a skip reason says is missing (``pytest.importorskip``'s wording), or None."""
    for quoted, bare in _MISSING.findall(str(reason)):
        name = quoted or bare
        if name.split(".")[0] in CI_INSTALLS:
            return name
    return None


def _fail_ci_skip(report, where: str) -> None:
    if os.environ.get("CI", "").lower() != "true" or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    module = _missing_ci_module(report.longrepr[2])
    if module is not None:
        report.outcome = "failed"
        report.longrepr = f"CI installs {module!r}, but {where} was skipped for lack of it: {report.longrepr[2]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_ci_skip(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level ``importorskip`` skips the whole module at collection: the same rule."""
    outcome = yield
    _fail_ci_skip(outcome.get_result(), collector.nodeid)
