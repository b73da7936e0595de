"""The run's state on a device mesh, built by the run recipe (:mod:`fraqat_jax.recipe.state`);
re-exported here."""

from fraqat_jax.recipe.state import TrainSetup, build

__all__ = ["TrainSetup", "build"]
