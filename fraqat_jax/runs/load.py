"""A finished (or interrupted) run read back: the teacher and the student of a workdir's checkpoint."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fraqat_jax.models.scan import unstack_flat
from fraqat_jax.nn import apply_schedules, quantized_layers, set_bits
from fraqat_jax.recipe.config import load_config, upgrade_saved
from fraqat_jax.recipe.models import abstract_models, load_teacher, make_student
from fraqat_jax.recipe.optim import make_optimizer, make_schedule
from fraqat_jax.runs import checkpoint as ckpt_lib

__all__ = ["StudentReader", "load_run", "unscanned"]


def unscanned(model, cfg):
    """``model`` (built with ``scan_layers``) rebuilt block by block, every value (weights, bit-widths,
    activation ranges) copied to its per-block place; ``model`` itself when it is not scanned.
    Exports work on this form: one frozen layer per diffusers layer."""
    if not cfg.scan_layers:
        return model
    plain_cfg = ml_collections.ConfigDict(cfg.to_dict())
    plain_cfg.scan_layers = False
    teacher_abs, student_abs = abstract_models(plain_cfg)
    target = student_abs if any(True for _ in quantized_layers(model)) else teacher_abs
    values = {path: v for path, v in unstack_flat(model, nnx.to_flat_state(nnx.state(model)))}
    graphdef, state = nnx.split(target)
    flat = [(path, var.replace(values[path].get_value())) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


class StudentReader:
    """Restores the student of any checkpoint of runs that share one student structure and config,
    building the restore target once (a comparison reads dozens of checkpoints)."""

    def __init__(self, student, cfg):
        self.graph, params_v, rest_v = nnx.split(student, nnx.Param, ...)
        params = nnx.to_pure_dict(params_v)
        tx = make_optimizer(cfg)
        target = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                  "ema": params if cfg.ema_decay > 0 else None, "step": jnp.zeros((), jnp.int32)}
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)  # noqa: E731
        self.state_target, self.rest_target = abstract(target), abstract(nnx.to_pure_dict(rest_v))

    def restore(self, workdir: str, step: int | None = None, *, keep: int = 1):
        """``(train state, student rest, meta)`` of checkpoint ``step`` (default: the latest)."""
        ckpt = ckpt_lib.Checkpointer(workdir, keep)
        try:
            step = ckpt.latest_step() if step is None else step
            if step is None:
                raise ValueError(f"{workdir!r} holds no checkpoint")
            return ckpt.restore(step, self.state_target, self.rest_target)
        finally:
            ckpt.close()

    def student(self, workdir: str, step: int | None = None, *, ema: bool = False, keep: int = 1):
        """The student module of checkpoint ``step``, its EMA weights when ``ema``."""
        state, rest, _ = self.restore(workdir, step, keep=keep)
        if ema and state["ema"] is None:
            raise ValueError(f"run {workdir!r} kept no EMA (ema_decay=0)")
        return nnx.merge(self.graph, state["ema"] if ema else state["params"], rest)


def load_run(workdir: str, *, step: int | None = None, ema: bool = False, unscan: bool = False,
             attention: str | None = None):
    """``(teacher, student, config)`` from a run's workdir (see the package docstring).

    ``unscan``: a run trained with ``scan_layers`` comes back block by block (see :func:`unscanned`).
    ``attention``: build the models with this attention kernel instead of the run's (``"xla"`` for
    exports: the same numbers on CPU, and traceable at a symbolic batch size)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} is not a run directory (no config.json)")
    with open(path) as f:
        cfg = load_config(base=upgrade_saved(json.load(f)))
    cfg.unlock()
    cfg.mesh = ""
    if attention is not None:
        cfg.attention = attention
    cfg.lock()
    teacher = load_teacher(cfg)
    reader = StudentReader(make_student(teacher, cfg), cfg)
    state, rest, meta = reader.restore(workdir, step, keep=int(cfg.keep_checkpoints))
    if ema and state["ema"] is None:
        raise ValueError(f"run {workdir!r} kept no EMA (ema_decay=0)")
    student = nnx.merge(reader.graph, state["ema"] if ema else state["params"], rest)
    last = max(int(meta["step"]) - 1, 0)
    if cfg.quant_rules != "none":
        set_bits(student, float(make_schedule(cfg)(last)))
        apply_schedules(student, last)
    if unscan:
        teacher, student = unscanned(teacher, cfg), unscanned(student, cfg)
    return teacher, student, cfg
