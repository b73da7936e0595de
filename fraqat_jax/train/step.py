"""The jitted distillation step and the optimizer builders, which live in the run recipe
(:mod:`fraqat_jax.recipe.step`, :mod:`fraqat_jax.recipe.optim`); re-exported here."""

from fraqat_jax.recipe.optim import make_lr_schedule, make_optimizer, make_schedule
from fraqat_jax.recipe.step import SeededStep, make_train_step

__all__ = ["SeededStep", "make_lr_schedule", "make_optimizer", "make_schedule", "make_train_step"]
