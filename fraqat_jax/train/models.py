"""The run's teacher and student, built by the run recipe (:mod:`fraqat_jax.recipe.models`);
re-exported here."""

from fraqat_jax.recipe.models import (abstract_models, family_of_run, load_teacher, make_student, student_rules,
                                      teacher_spec)

__all__ = ["abstract_models", "family_of_run", "load_teacher", "make_student", "student_rules", "teacher_spec"]
