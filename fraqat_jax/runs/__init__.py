"""runs/: a run's workdir read back and its checkpoints: what train writes and eval, export, compare
and plan read.

``checkpoint.py`` holds the orbax checkpoint format of the train state (:class:`Checkpointer`,
which the trainer writes with) and :func:`checkpoint_steps`, the one listing of a workdir's
checkpoints. ``load.py`` rebuilds a finished run: :func:`load_run` gives ``(teacher, student,
config)`` (also reachable as ``fraqat_jax.train.load_run``), :class:`StudentReader` restores the
student of many checkpoints of one structure, :func:`unscanned` unrolls a scanned model. The part
imports the run recipe (``recipe/``: the config, the model builders, the optimizer), ``models/`` and
``nn/``, never ``train/``; ``checkpoint.py`` imports nothing of the package, so the trainer can use it.
"""

from fraqat_jax.runs.checkpoint import Checkpointer, checkpoint_steps
from fraqat_jax.runs.load import StudentReader, load_run, unscanned

__all__ = ["Checkpointer", "StudentReader", "checkpoint_steps", "load_run", "unscanned"]
