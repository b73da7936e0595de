"""The run's models: the teacher named by the config, found and loaded by its family
(``fraqat_jax.family``), and its quantized student copy."""

from __future__ import annotations

from flax import nnx

from fraqat_jax import nn as fq_nn
from fraqat_jax.family import Family, family_for_teacher

__all__ = ["abstract_models", "family_of_run", "load_teacher", "make_student", "student_rules", "teacher_spec"]


def family_of_run(cfg) -> Family:
    """The family whose models ``cfg.teacher`` names (``ConfigError`` naming it when none does)."""
    return family_for_teacher(cfg.teacher)


def load_teacher(cfg) -> nnx.Module:
    """The teacher named by ``cfg.teacher`` (see the config help); ``ConfigError`` if no family
    supports its class (checked before any weight is read)."""
    return family_of_run(cfg).load_teacher(cfg)


def make_student(teacher, cfg):
    """A quantized copy of ``teacher`` by the family's rules (``quant_rules=none``: a plain copy)."""
    student = nnx.clone(teacher)
    if cfg.quant_rules == "none":
        return student
    return fq_nn.quantize_model(student, student_rules(cfg))


def student_rules(cfg) -> list:
    """The run's quantization rules: the family's :meth:`~fraqat_jax.family.Family.default_rules`."""
    return family_of_run(cfg).default_rules(cfg)


def teacher_spec(cfg) -> tuple[type, dict]:
    """``(port class, model config)`` of the config's teacher, read without loading weights."""
    return family_of_run(cfg).teacher_spec(cfg)


def abstract_models(cfg):
    """``(teacher, student)`` as the run builds them, with ``jax.ShapeDtypeStruct`` leaves: shapes,
    dtypes and sharding names only, no memory and no weights read (for ahead-of-time planning)."""
    build = family_of_run(cfg).teacher_builder(cfg)
    return nnx.eval_shape(build), nnx.eval_shape(lambda: make_student(build(), cfg))
