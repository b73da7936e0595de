"""FraQAT distillation trainer: ``python -m fraqat_jax.train`` and its Python API.

Command line (``python -m fraqat_jax.train --help`` lists every config key with its default)::

    python -m fraqat_jax.train [--config FILE] [--workdir DIR] [--steps N] [--schedule NAME]
                               [--mesh SPEC] [--log-every K] [--seed S] [--set KEY=VALUE ...]

Python API (used by ``fraqat_jax.eval`` / ``compare``)::

    from fraqat_jax import train
    cfg = train.get_config()              # ml_collections.ConfigDict, the built-in default
    cfg.steps = 50; cfg.schedule = "constant"
    result = train.run(cfg, workdir="runs/x")   # a dict also works: train.run({"steps": 50})
    result.workdir, result.steps, result.final_loss, result.metrics   # metrics: list of dicts
    teacher, student, cfg = train.load_run("runs/x")   # NNX modules, student quantized, bits=final
    teacher, student, cfg = train.load_run("runs/x", ema=True)  # EMA weights if the run kept them

- ``get_config() -> ConfigDict``: the default run (built-in digits data and tiny DiT teacher).
  ``load_config(path_or_None, overrides: list[str]) -> ConfigDict`` applies a config file
  (a Python file with ``get_config()``) and ``KEY=VALUE`` overrides, validating every key/value
  (``ValueError`` naming the bad key/value and what is allowed).
- ``run(config, *, workdir=None) -> RunResult``: trains to ``config.steps`` optimizer updates,
  resuming from ``workdir/checkpoints`` when a checkpoint is there. Writes ``workdir/metrics.jsonl``
  (rows ``{"step", "bits", "loss", "lr", "steps_per_sec", ...}``, appended on resume),
  TensorBoard events under ``workdir/tb``, the family's samples ``workdir/samples/step_XXXXXX_bits_B.png`` (images) or ``.txt`` (text)
  at each change of bit-width, ``workdir/config.json`` and ``workdir/summary.json``.
  ``RunResult`` fields: ``workdir``, ``steps`` (updates done), ``final_loss``, ``final_bits``,
  ``metrics`` (rows written by this call), ``status`` ("completed" | "preempted" | "nan").
- ``load_run(workdir, *, step=None, ema=False) -> (teacher, student, config)``: rebuilds the teacher
  (frozen, full precision) and the quantized student from the latest (or given) checkpoint, with
  the student's bit-width set to the schedule's value at its final step.
- ``build_models(config) -> (teacher, student)``: teacher and freshly quantized student copy.

Layout of a workdir::

    WORKDIR/checkpoints/<step>/   orbax: student params, optimizer state, step, data position, EMA
    WORKDIR/config.json           the resolved config
    WORKDIR/metrics.jsonl         one JSON row per logged step
    WORKDIR/tb/                   TensorBoard event files
    WORKDIR/samples/*.png         teacher (top) / student (bottom) samples from the same noise
    WORKDIR/summary.json          closing summary
"""

from __future__ import annotations

__all__ = ["RunResult", "build_models", "get_config", "load_config", "load_run", "run"]


def __getattr__(name):
    if name in ("get_config", "load_config"):  # what a run is lives in fraqat_jax.recipe
        from fraqat_jax.recipe import config as _config

        return getattr(_config, name)
    if name in ("run", "RunResult", "build_models"):
        from fraqat_jax.train import loop as _loop

        return getattr(_loop, name)
    if name == "load_run":  # reading a finished run lives in fraqat_jax.runs
        from fraqat_jax.runs import load as _load

        return _load.load_run
    raise AttributeError(f"module 'fraqat_jax.train' has no attribute {name!r}")
