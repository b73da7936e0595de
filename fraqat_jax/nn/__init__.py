"""Flax NNX integration: quantized layers, rules that swap them into any model, bit-width state,
calibration of static activation ranges, and the frozen integer serving form."""

from fraqat_jax.nn.calibration import calibrate
from fraqat_jax.nn.freeze import Codes, FrozenConv, FrozenLinear, Scale, freeze
from fraqat_jax.nn.layers import ActRange, Bits, QuantConv, QuantEinsum, QuantLinear
from fraqat_jax.nn.rules import (DEFAULT_RULES, Rule, apply_schedules, bits_of, quantize_model,
                                 quantized_layers, set_bits)

__all__ = [
    "ActRange", "Bits", "Codes", "DEFAULT_RULES", "FrozenConv", "FrozenLinear", "Scale", "freeze", "QuantConv", "QuantEinsum", "QuantLinear", "Rule",
    "apply_schedules", "bits_of", "calibrate", "quantize_model", "quantized_layers", "set_bits",
]
