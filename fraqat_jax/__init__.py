"""fraqat_jax: FraQAT (fractional-bit quantization-aware distillation) for diffusion transformers.

Public API: ``quantize`` (fake quantizer with straight-through gradients), ``schedules``
(bit-width schedules), and the NNX integration (``Rule``, ``quantize_model``, ``set_bits``,
``calibrate``, ``freeze``).
"""

from fraqat_jax import schedules
from fraqat_jax.models import from_diffusers
from fraqat_jax.nn import Rule, calibrate, freeze, quantize_model, set_bits
from fraqat_jax.quant import quantize

__all__ = ["Rule", "calibrate", "freeze", "from_diffusers", "quantize", "quantize_model", "schedules", "set_bits"]
