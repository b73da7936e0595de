"""recipe/: what a run *is*, below the trainer and every reader of a run.

``config``: the config keys, typed (:class:`~fraqat_jax.recipe.config.TrainConfig` and the family's
own ``Config``, frozen dataclasses with a default, help and check per key), ``get_config``,
``load_config`` (``--config FILE`` and ``--set KEY=VALUE``: the family is chosen after both) and
``upgrade_saved`` for configs saved by earlier versions. ``models``: the run's family
(``family_of_run``), its teacher and quantized student (``load_teacher``, ``make_student``,
``abstract_models``). ``optim``: the bit-width schedule, the learning-rate schedule and the
optimizer. ``step``: the jitted distillation step. ``state``: the step's models, optimizer state
and shardings on a device mesh (``build``, :class:`~fraqat_jax.recipe.state.TrainSetup`).

``train/``, ``runs/``, ``eval/``, ``export/``, ``plan/`` and ``compare/`` import it; it imports
``family/`` (the interface, never a family package), ``parallel/``, ``nn/``, ``quant/``,
``models/`` and ``schedules.py``.
"""

from fraqat_jax.recipe.config import ConfigError, TrainConfig, get_config, keys_for, load_config, upgrade_saved
from fraqat_jax.recipe.models import (abstract_models, family_of_run, load_teacher, make_student, student_rules,
                                      teacher_spec)
from fraqat_jax.recipe.optim import make_lr_schedule, make_optimizer, make_schedule

__all__ = ["ConfigError", "TrainConfig", "abstract_models", "family_of_run", "get_config", "keys_for", "load_config",
           "load_teacher", "make_lr_schedule", "make_optimizer", "make_schedule", "make_student", "student_rules",
           "teacher_spec", "upgrade_saved"]
