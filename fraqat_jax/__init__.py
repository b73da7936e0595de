"""fraqat_jax: FraQAT (fractional-bit quantization-aware distillation) for diffusion transformers.

Public API: ``quantize`` (fake quantizer with straight-through gradients), ``schedules``
(bit-width schedules), and the NNX integration (``Rule``, ``quantize_model``, ``set_bits``,
``calibrate``, ``freeze``).

The names are imported on first use (module ``__getattr__``), so a part that needs no JAX, such as
the host runner ``python -m fraqat_jax.deploy``, runs where JAX is not installed.
"""

from __future__ import annotations

import importlib

__all__ = ["Rule", "calibrate", "freeze", "from_diffusers", "quantize", "quantize_model", "schedules", "set_bits"]

_WHERE = {"schedules": None, "from_diffusers": "fraqat_jax.models", "Rule": "fraqat_jax.nn",
          "calibrate": "fraqat_jax.nn", "freeze": "fraqat_jax.nn", "quantize_model": "fraqat_jax.nn",
          "set_bits": "fraqat_jax.nn", "quantize": "fraqat_jax.quant"}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'fraqat_jax' has no attribute {name!r}")
    module = _WHERE[name]
    value = importlib.import_module(f"fraqat_jax.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
