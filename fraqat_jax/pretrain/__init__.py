"""pretrain/: builds the shipped teachers.

``python -m fraqat_jax.pretrain [--size s|m]`` trains the class-conditional digits DiTs
(``builtin``, ``builtin:m``; the recipe and sizes are in ``teachers.py``'s docstring);
``python -m fraqat_jax.pretrain.text`` the tiny Gemma-2 language model ``builtin:lm`` on the CPython
standard library (``text.py``); ``python -m fraqat_jax.pretrain.sana`` (or ``--size sana``) the
text-to-image ``SanaPipeline`` folder ``builtin:sana`` on captioned digits (``sana.py``).

``teachers.py`` holds the DiT recipe (:func:`pretrain`, :data:`TEACHER_CONFIG`, :data:`TEACHER_CONFIG_M`),
``text.py`` the language model's, ``__main__.py`` the command line. The part imports ``data/``, ``diffusion/`` and ``text/``
(their teacher folders) and ``models/``; nothing imports it but its own command line.
"""

from fraqat_jax.pretrain.teachers import SIZES, TEACHER_CONFIG, TEACHER_CONFIG_M, pretrain

__all__ = ["SIZES", "TEACHER_CONFIG", "TEACHER_CONFIG_M", "main", "pretrain"]


def __getattr__(name):
    if name == "main":  # the command line, imported only when asked for
        from fraqat_jax.pretrain import __main__ as cli

        return cli.main
    raise AttributeError(f"module 'fraqat_jax.pretrain' has no attribute {name!r}")
