"""fraqat_jax: FraQAT (fractional-bit quantization-aware distillation) for diffusion transformers.

Public API: ``quantize`` (fake quantizer with straight-through gradients), ``schedules``
(bit-width schedules), and the NNX integration (``Rule``, ``quantize_model``, ``set_bits``,
``calibrate``, ``freeze``).
"""

from fraqat_jax import schedules
from fraqat_jax.quant import quantize

__all__ = ["quantize", "schedules"]
