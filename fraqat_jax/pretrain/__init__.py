"""pretrain/: builds the built-in teachers, class-conditional DiTs on the shipped 8x8 digits.

``python -m fraqat_jax.pretrain [--size s|m] [--steps N] [--out DIR]`` trains
``DiTTransformer2DModel`` (``--size s``: :data:`TEACHER_CONFIG`, about 0.4 M parameters, the
``builtin`` teacher; ``--size m``: :data:`TEACHER_CONFIG_M`, about 3.9 M parameters, the
``builtin:m`` teacher, shipped: 15.4 MB) with the DiT recipe in pixel space: DDPM linear
betas over 1000 steps, epsilon-prediction MSE, 10% label dropout to the null class (for
classifier-free guidance), AdamW, EMA of the weights (the EMA is what is saved). Writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` to ``fraqat_jax/assets/digits_dit``
(``--size m``: ``digits_dit_m``) or ``--out``.

``teachers.py`` holds the recipe (:func:`pretrain`, :data:`TEACHER_CONFIG`, :data:`TEACHER_CONFIG_M`),
``__main__.py`` the command line. The part imports ``data/``, ``diffusion/`` (its teacher folders) and
``models/``; nothing imports it but its own command line.
"""

from fraqat_jax.pretrain.teachers import SIZES, TEACHER_CONFIG, TEACHER_CONFIG_M, pretrain

__all__ = ["SIZES", "TEACHER_CONFIG", "TEACHER_CONFIG_M", "main", "pretrain"]


def __getattr__(name):
    if name == "main":  # the command line, imported only when asked for
        from fraqat_jax.pretrain import __main__ as cli

        return cli.main
    raise AttributeError(f"module 'fraqat_jax.pretrain' has no attribute {name!r}")
