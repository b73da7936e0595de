"""The run's state on a device mesh: models split for a functional step, shardings, optimizer, step.

:func:`build` turns a config and a mesh into a :class:`TrainSetup`: the teacher and the quantized
student split into graph definitions and pure-dict states (``nnx.split`` once, ``nnx.merge`` inside
the jitted step), each leaf placed by its logical axis names (``parallel.param_spec``), the optimizer
state sharded like the parameters, and the jitted step. With ``abstract=True`` every array is a
``jax.ShapeDtypeStruct`` carrying its sharding and nothing is loaded or allocated, so the same
program can be compiled ahead of time for a topology that is not present (``fraqat_jax.plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from fraqat_jax import schedules
from fraqat_jax.parallel import mesh as mesh_lib
from fraqat_jax.family import Family
from fraqat_jax.recipe.models import abstract_models, family_of_run, load_teacher, make_student
from fraqat_jax.recipe.optim import make_lr_schedule, make_optimizer, make_schedule
from fraqat_jax.recipe.step import make_train_step

__all__ = ["TrainSetup", "build"]


@dataclasses.dataclass
class TrainSetup:
    """Everything the jitted step needs, placed on ``mesh`` (see the module docstring).

    ``train_state`` is ``{"params", "opt_state", "ema", "step"}``; ``rest`` the student's
    non-trainable state (bit-widths, activation ranges); ``*_sh`` the matching shardings.
    """

    cfg: Any
    mesh: Mesh
    family: Family
    model_config: Mapping[str, Any]
    schedule: schedules.Schedule
    tx: optax.GradientTransformation
    lr_schedule: Callable
    teacher_graph: Any
    student_graph: Any
    teacher_state: dict
    rest: dict
    train_state: dict
    teacher_sh: dict
    rest_sh: dict
    state_sh: dict

    def step_fn(self, *, donate: bool = True):
        """The jitted ``step(train_state, teacher_state, rest, batch) -> (train_state, metrics)``."""
        return make_train_step(self.cfg, schedule=self.schedule, teacher_graph=self.teacher_graph,
                               student_graph=self.student_graph, family=self.family, tx=self.tx,
                               lr_schedule=self.lr_schedule, shardings=(self.state_sh, self.teacher_sh, self.rest_sh, None),
                               donate=donate)

    def student(self, params, rest=None) -> nnx.Module:
        """The student module with ``params`` (and ``rest``, default the run's)."""
        return nnx.merge(self.student_graph, params, self.rest if rest is None else rest)

    def teacher(self) -> nnx.Module:
        return nnx.merge(self.teacher_graph, self.teacher_state)


def build(cfg, mesh: Mesh, *, abstract: bool = False) -> TrainSetup:
    """The :class:`TrainSetup` of config ``cfg`` on ``mesh`` (abstract: shapes and shardings only)."""
    if abstract:
        teacher, student = abstract_models(cfg)
    else:
        teacher = load_teacher(cfg)
        student = make_student(teacher, cfg)
    family = family_of_run(cfg)
    model_config = dict(teacher.config)
    teacher_graph, teacher_v = nnx.split(teacher)
    student_graph, params_v, rest_v = nnx.split(student, nnx.Param, ...)
    teacher_sh, params_sh, rest_sh = (mesh_lib.state_shardings(v, mesh) for v in (teacher_v, params_v, rest_v))
    teacher_state = mesh_lib.place(nnx.to_pure_dict(teacher_v), teacher_sh, abstract=abstract)
    params = mesh_lib.place(nnx.to_pure_dict(params_v), params_sh, abstract=abstract)
    rest = mesh_lib.place(nnx.to_pure_dict(rest_v), rest_sh, abstract=abstract)
    del teacher, student, teacher_v, params_v, rest_v

    tx = make_optimizer(cfg)
    repl = mesh_lib.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, params_sh, transform_non_params=lambda _: repl)
    ema_on = cfg.ema_decay > 0
    state_sh = {"params": params_sh, "opt_state": opt_sh, "ema": params_sh if ema_on else None, "step": repl}
    if abstract:
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_sh)
        train_state = {"params": params, "opt_state": opt_state, "ema": params if ema_on else None,
                       "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)}
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        train_state = {"params": params, "opt_state": opt_state,
                       "ema": jax.tree.map(jnp.copy, params) if ema_on else None,
                       "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}
    return TrainSetup(cfg=cfg, mesh=mesh, family=family, model_config=model_config, schedule=make_schedule(cfg),
                      tx=tx, lr_schedule=make_lr_schedule(cfg), teacher_graph=teacher_graph,
                      student_graph=student_graph, teacher_state=teacher_state, rest=rest, train_state=train_state,
                      teacher_sh=teacher_sh, rest_sh=rest_sh, state_sh=state_sh)
