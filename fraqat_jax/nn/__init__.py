"""Flax NNX integration of the quantizer; imports only ``quant/`` and ``schedules.py``.

``layers``: quantized counterparts of ``nnx.Linear``/``Conv``/``Einsum`` (fake quantization, bit-width
as state). ``rules``: which layers get quantized and how (``Rule``, ``quantize_model``, ``set_bits``).
``calibration`` (with the leaf ``stats``): static activation ranges. ``freeze``: the integer serving
form (with the leaf ``code_matmul``: its CPU matmul forms). ``graph``: module paths and layer replacement, shared by ``rules`` and ``freeze``.
"""

from fraqat_jax.nn.calibration import calibrate
from fraqat_jax.nn.freeze import Codes, FrozenConv, FrozenLinear, Scale, freeze
from fraqat_jax.nn.graph import quantized_layers
from fraqat_jax.nn.layers import ActRange, Bits, QuantConv, QuantEinsum, QuantLinear
from fraqat_jax.nn.rules import (DEFAULT_RULES, Rule, apply_schedules, bits_of, prequantized, quantize_model,
                                 set_bits)

__all__ = [
    "DEFAULT_RULES",
    "ActRange",
    "Bits",
    "Codes",
    "FrozenConv",
    "FrozenLinear",
    "QuantConv",
    "QuantEinsum",
    "QuantLinear",
    "Rule",
    "Scale",
    "apply_schedules",
    "bits_of",
    "calibrate",
    "freeze",
    "prequantized",
    "quantize_model",
    "quantized_layers",
    "set_bits",
]
