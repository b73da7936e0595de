"""The built-in default: the shipped tiny digits DiT distilled on the shipped UCI digits.

``python -m fraqat_jax.train`` with no arguments runs exactly this (``--config configs/default.py``
is the same). Every key and its meaning: ``python -m fraqat_jax.train --help``.
"""

from fraqat_jax.recipe.config import get_config as _default


def get_config():
    return _default()
