"""Pure quantization functions (no Flax): the fractional-bit fake quantizer and its codes."""

from fraqat_jax.quant.fake import (
    MAX_BITS,
    MIN_BITS,
    check_bits,
    dequantize,
    quantize,
    quantize_codes,
)

__all__ = ["MAX_BITS", "MIN_BITS", "check_bits", "dequantize", "quantize", "quantize_codes"]
