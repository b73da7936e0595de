"""What the image and the text runner share: the manifest, the sessions, errors and timing.

Needs numpy and onnxruntime (and ``onnxruntime-qnn`` for the QNN provider); imports no JAX.

* :func:`read_manifest` reads ``DIR/pipeline.json`` and checks its ``kind``;
* :func:`component_path` gives the file a component runs from on a provider: its EPContext model
  (``"context"``) on ``qnn``, its ONNX graph (``"onnx"``) on ``cpu``;
* :func:`make_session` opens an onnxruntime session on ``qnn`` (Qualcomm's HTP backend, CPU
  fallback disabled: a node HTP does not take is an error, not a silent CPU run) or ``cpu``;
* :class:`Component` runs a component: its host prologue on the CPU (when it has one), then its
  graph; :func:`load_component` opens one from the manifest;
* :class:`Timer` adds up the seconds of each named part and prints them;
* :class:`DeployError`: bad input; the command line prints it on one line and exits 2.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import numpy as np

__all__ = ["EP_NAME", "KINDS", "MANIFEST", "PROVIDERS", "SOC_DEFAULT", "Component", "DeployError", "Timer", "htp_options",
           "component_path", "load_component", "make_session", "qnn_library", "read_manifest"]

MANIFEST = "pipeline.json"
KINDS = ("image", "text")
PROVIDERS = ("qnn", "cpu")
EP_NAME = "QNNExecutionProvider"
#: The SoC an EPContext model is opened for when the manifest names none (Snapdragon 8 Elite).
SOC_DEFAULT = {"name": "sm8750", "soc_model": 69, "htp_arch": 79}


class DeployError(ValueError):
    """Bad input to the runner (a path, a folder, a flag value); one line, exit status 2."""


def read_manifest(folder: str) -> dict:
    """``folder/pipeline.json`` as a dict; :class:`DeployError` when ``folder`` does not exist, holds
    no manifest, or the manifest is not JSON or names an unknown ``kind``."""
    if not os.path.exists(folder):
        raise DeployError(f"{folder!r} does not exist")
    if not os.path.isdir(folder):
        raise DeployError(f"{folder!r} is not a folder; give the folder written by export --format qnn")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise DeployError(f"{folder!r} is not a pipeline folder: it has no {MANIFEST} (export --format qnn writes one)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot read {path!r}: {e}") from None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind not in KINDS:
        raise DeployError(f"{path!r} has kind {kind!r}; allowed: {', '.join(KINDS)}")
    return manifest


def component_path(folder: str, manifest: Mapping, name: str, provider: str, key: str | None = None) -> str:
    """The file component ``name`` runs from: ``"context"`` (the EPContext model) on ``qnn``,
    ``"onnx"`` on ``cpu``; ``key`` picks another file of the component (e.g. ``"prologue"``).
    :class:`DeployError` when the manifest lacks the component or the file is missing."""
    components = manifest.get("components") or {}
    if name not in components:
        raise DeployError(f"{os.path.join(folder, MANIFEST)!r} names no component {name!r} "
                          f"(it has: {', '.join(components) or 'none'})")
    key = key or ("context" if provider == "qnn" else "onnx")
    rel = components[name].get(key)
    if not rel:
        raise DeployError(f"component {name!r} in {folder!r} has no {key!r} file")
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
        raise DeployError(f"component {name!r} is missing: {path!r} does not exist")
    return path


def qnn_library() -> str:
    """The QNN HTP backend library of the ``onnxruntime-qnn`` plugin, registered with onnxruntime
    once; :class:`DeployError` when the plugin is not installed."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as e:
        raise DeployError(f"--provider qnn needs onnxruntime-qnn (pip install 'fraqat_jax[qnn]'): {e}") from None
    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn.get_qnn_htp_path()


def htp_options(soc: Mapping | None = None, *, fallback: bool = False, log_level: int = 3):
    """``onnxruntime.SessionOptions`` for the QNN HTP backend of ``soc`` (``{"soc_model",
    "htp_arch"}``, default SM8750): basic graph optimizations only (the graph runs as written, no
    CPU-side fusions before partitioning), CPU fallback disabled unless ``fallback``, and graph-input
    quantization on HTP too (``offload_graph_io_quantization=0``; by default the provider leaves a
    QuantizeLinear of a graph input to the CPU)."""
    import onnxruntime as ort

    backend = qnn_library()
    soc = dict(SOC_DEFAULT, **(soc or {}))
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if not fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    options.add_provider_for_devices(devices, {"backend_path": backend, "htp_arch": str(soc["htp_arch"]),
                                               "soc_model": str(soc["soc_model"]),
                                               "offload_graph_io_quantization": "0"})
    return options


def make_session(path: str, provider: str, soc: Mapping | None = None, log_level: int = 3):
    """An onnxruntime session of ``path``: on ``"qnn"`` the HTP backend for ``soc`` (a manifest's
    ``{"soc_model", "htp_arch"}``) with CPU fallback disabled (:func:`htp_options`); on ``"cpu"``
    onnxruntime's CPU provider. Basic graph optimizations only, so the graph runs as written."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise DeployError(f"unknown provider {provider!r}; allowed: {', '.join(PROVIDERS)}")
    if provider == "cpu":
        options = ort.SessionOptions()
        options.log_severity_level = log_level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(path, htp_options(soc, log_level=log_level))


class Component:
    """One network of a folder: ``prologue`` (a CPU session or None) computes extra inputs of
    ``session`` from the caller's feeds; calling it returns the session's outputs by name."""

    def __init__(self, session, prologue=None):
        self.session, self.prologue = session, prologue
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(feeds)
        if self.prologue is not None:
            names = [o.name for o in self.prologue.get_outputs()]
            values = self.prologue.run(names, {i.name: feeds[i.name] for i in self.prologue.get_inputs()})
            feeds.update(zip(names, values))
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: feeds[k] for k in self.inputs})))


def load_component(folder: str, manifest: Mapping, name: str, provider: str) -> Component:
    """Component ``name`` of ``folder`` on ``provider``, with its prologue (CPU) when it has one."""
    path = component_path(folder, manifest, name, provider)
    prologue = None
    if manifest["components"][name].get("prologue"):
        prologue = make_session(component_path(folder, manifest, name, provider, "prologue"), "cpu")
    return Component(make_session(path, provider, manifest.get("soc")), prologue)


class Timer:
    """Seconds per named part: ``with timer("transformer"): ...`` adds one call's time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, name: str):
        timer = self

        class _Lap:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start
                timer.calls[name] = timer.calls.get(name, 0) + 1

        return _Lap()

    def lines(self) -> list[str]:
        """``name: S s (N calls, M ms per call)`` for each part, in the order first timed."""
        return [f"{k}: {s:.3f} s ({self.calls[k]} call{'s' * (self.calls[k] != 1)}, "
                f"{1000 * s / self.calls[k]:.1f} ms per call)" for k, s in self.seconds.items()]
