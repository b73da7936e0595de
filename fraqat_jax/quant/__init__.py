"""All quantizer arithmetic, pure JAX (no Flax, nothing else of the package).

``fake``: the fractional-bit fake quantizer (straight-through gradient), its integer codes and
scales (per tensor, channel or group), bit-width validation. ``static``: activation quantization on a
fixed, calibrated range. ``error``: the relative difference of a quantized form's output from its
reference (numpy). ``nn/`` wraps these in layers; nothing else computes codes.
"""

from fraqat_jax.quant.error import rel_diff
from fraqat_jax.quant.fake import (
    MAX_ACT_BITS,
    MAX_BITS,
    MIN_BITS,
    check_bits,
    dequantize,
    quantize,
    quantize_codes,
    range_codes,
    validate_bits,
)
from fraqat_jax.quant.static import grid_codes, nudge_range, static_codes, static_fake_quant, zero_point

__all__ = ["MAX_ACT_BITS", "MAX_BITS", "MIN_BITS", "check_bits", "dequantize", "grid_codes", "quantize",
           "quantize_codes", "range_codes", "nudge_range", "rel_diff", "static_codes", "static_fake_quant",
           "validate_bits", "zero_point"]
