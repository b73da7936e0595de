"""Quantized counterparts of ``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum`` (fake quantization).

A quantized layer is built *from* an existing layer (:func:`fraqat_jax.quantize_model` does it) and
takes over that layer's ``nnx.Param`` objects as they are: the same ``kernel`` and ``bias`` names,
shapes, dtypes and metadata (sharding names included), so checkpoints and the diffusers converter
work before and after quantization. It also copies the layer's configuration (padding, strides,
einsum string, dtype, precision, ...) and runs the original Flax forward pass on the fake-quantized
kernel and input, so its output equals the original layer's on the quantized values.

State added to each quantized layer (not ``nnx.Param``, so optimizers and gradients skip it):

* ``weight_bits``: :class:`Bits`, the weight bit-width, a float32 scalar (``None`` attribute when
  the rule keeps the weights in full precision; ``bits`` is the same attribute under its old
  name). Being data, a new value never recompiles a jitted step.
  A rule's per-layer schedule travels as the variable's ``schedule`` metadata.
* ``act_range``: :class:`ActRange`, the static activation range ``[lo, hi]`` (float32, shape (2,))
  on every layer whose input is quantized (None otherwise); NaN until :func:`fraqat_jax.calibrate`
  sets it, used only when ``act_ranges == "static"``.

Activation quantization (input of the layer, ``act_bits``, asymmetric min/max as the paper's
dynamic quantization, scale ``(hi - lo) / (2**act_bits - 1)``, see ``fraqat_jax.quant``). How a
range is found, ``act_ranges``:

* ``"dynamic"``: min/max of the input at run time, per ``act_granularity``:

  * ``"token"``: one range per token (min/max over the last, feature axis, per index of all
    leading axes). The default for linear layers: a GPU/TPU computes it on the fly, and it is
    exact for an integer matmul because the scale factors out of the contraction.
  * ``"tensor"``: one range for the whole input tensor (the paper's per-tensor form). Conv and
    einsum layers accept only ``"tensor"``: their contraction mixes tokens, so a per-token scale
    would not factor out of an integer convolution.
* ``"static"``: the fixed range in ``act_range`` (``[lo, hi]`` from calibration); values outside
  it clip and get zero gradient, inside it the gradient is straight-through.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.nn.stats import record
from fraqat_jax.quant import check_bits, quantize, quantize_codes, static_codes, static_fake_quant

ACT_GRANULARITIES = ("token", "tensor")
ACT_RANGES = ("dynamic", "static")


class Bits(nnx.Variable):
    """Weight bit-width of one quantized layer: a float32 scalar in [2, 16], never trained.

    Metadata ``schedule``: the layer's own bit-width schedule (``step -> bits``) when its rule gave
    one, else None; :func:`fraqat_jax.nn.apply_schedules` evaluates it.
    """


class ActRange(nnx.Variable):
    """Static activation range ``[lo, hi]`` of a layer's input (float32, shape (2,)); NaN until
    :func:`fraqat_jax.calibrate` sets it."""


class KernelView:
    """Attribute view of a module with some attributes replaced (e.g. the kernel by its quantized
    value), so the original Flax ``__call__`` can run unchanged on it."""

    def __init__(self, module, **overrides):
        self.__dict__["_module"] = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def identity_promote(args, dtype=None):
    """A ``promote_dtype`` that leaves arguments as they are (integer operands must stay integer)."""
    return args


def token_axes(ndim: int) -> tuple[int, ...] | None:
    """Axes kept by per-token activation scales: all but the last (feature) axis."""
    return tuple(range(ndim - 1)) if ndim > 1 else None


class QuantMixin:
    """Shared state and logic of the quantized layers; see the module docstring."""

    KIND = ""  # "Linear", "Conv" or "Einsum": the name rules' ``layer_types`` use.
    # Per token needs the contraction to leave tokens apart, which only a Linear layer guarantees.
    DEFAULT_ACT_GRANULARITY = "tensor"

    def __setattr__(self, name, value):
        # The old words, kept for callers not yet moved to the vocabulary (the ONNX export's static
        # view): "static" is how a range is found, not a granularity; a layer's "bits" are its weights'.
        if name == "act_granularity" and value == "static":
            name = "act_ranges"
        elif name == "bits":
            name = "weight_bits"
        super().__setattr__(name, value)

    @property
    def bits(self):
        """The old name of :attr:`weight_bits` (the same :class:`Bits` variable, or None)."""
        return self.weight_bits

    def __init__(self, layer, *, weight_bits=8.0, schedule=None, act_bits=8.0, symmetric=True,
                 channel_axis=None, group_size=None, act_granularity=None, act_ranges="dynamic"):
        """Builds the quantized form of an ``nnx.Linear``, ``nnx.Conv`` or ``nnx.Einsum`` layer.

        Args:
          layer: the layer to quantize (its Param objects are shared, not copied).
          weight_bits: initial weight bit-width in [2, 16], or None for full-precision weights.
          schedule: the layer's own bit-width schedule (stored as ``Bits`` metadata) or None.
          act_bits: input bit-width, or None to leave the input unquantized.
          symmetric, channel_axis, group_size: weight quantizer options of ``fraqat_jax.quantize``.
          act_granularity: 'token' or 'tensor', the granularity of dynamic ranges (see the module
            docstring); None takes the layer kind's ``DEFAULT_ACT_GRANULARITY`` (per token for
            Linear, else per tensor).
          act_ranges: 'dynamic' (min/max at run time) or 'static' (the calibrated ``act_range``).
        """
        self._take_over(layer, weight_bits=weight_bits, schedule=schedule, act_bits=act_bits,
                        symmetric=symmetric, channel_axis=channel_axis, group_size=group_size,
                        act_granularity=act_granularity or self.DEFAULT_ACT_GRANULARITY, act_ranges=act_ranges)

    def _take_over(self, layer, *, weight_bits, schedule, act_bits, symmetric, channel_axis,
                   group_size, act_granularity, act_ranges):
        nodes = layer._pytree__nodes
        for name, value in vars(layer).items():
            if name.startswith("_pytree__"):
                continue
            setattr(self, name, nnx.data(value) if nodes.get(name, False) else nnx.static(value))
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity={act_granularity!r} is not allowed: use one of {ACT_GRANULARITIES}")
        if act_ranges not in ACT_RANGES:
            raise ValueError(f"act_ranges={act_ranges!r} is not allowed: use one of {ACT_RANGES}")
        if act_bits is not None and act_granularity == "token" and self.KIND != "Linear":
            raise ValueError(
                f"act_granularity='token' is not allowed for a {self.KIND} layer (its contraction "
                "mixes tokens); use 'tensor', or static ranges (act_ranges='static')"
            )
        kernel = self.kernel
        stack = self.stack_shape()
        # Validates channel_axis / group_size against the kernel now, not at the first call.
        jax.eval_shape(
            lambda k: quantize(k, 8.0, symmetric=symmetric, channel_axis=channel_axis, group_size=group_size),
            jax.ShapeDtypeStruct(kernel.shape[len(stack):], kernel.dtype),
        )
        self.weight_symmetric = symmetric
        self.channel_axis = channel_axis
        self.group_size = group_size
        self.act_bits = None if act_bits is None else float(act_bits)
        self.act_granularity = act_granularity
        self.act_ranges = act_ranges
        if weight_bits is None:
            self.weight_bits = None
        else:
            self.weight_bits = Bits(jnp.broadcast_to(check_bits(weight_bits, name="weight_bits"), stack), schedule=schedule)
        # Every layer with a quantized input holds a range, so calibration changes values, not the
        # state's structure; NaN until calibrated, so an uncalibrated static layer fails loudly.
        self.act_range = nnx.data(None)
        if act_bits is not None:
            self.act_range = ActRange(jnp.full((*stack, 2), jnp.nan, jnp.float32))

    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes of a kernel stacked over blocks (``models.scan``: one layer object holds
        the same layer of every block), ``()`` for a single layer. Bit-widths and activation
        ranges get these axes too, so inside the scan each block sees its own."""
        rank = {"Linear": 2, "Conv": len(getattr(self, "kernel_size", ())) + 2,
                "Einsum": len(getattr(self, "kernel_shape", ()))}[self.KIND]
        return tuple(self.kernel.shape[: len(self.kernel.shape) - rank])

    # -- the two quantizers -------------------------------------------------------------------
    def quantized_kernel(self):
        """The kernel as the forward pass sees it (fake-quantized at ``bits`` unless None, or unless
        ``kernel_prequantized``: the kernel already holds its quantized value, see
        :func:`fraqat_jax.nn.prequantized`)."""
        kernel = self.kernel[...]
        if getattr(self, "kernel_prequantized", False):
            return kernel
        if getattr(self, "mask", None) is not None:
            kernel = kernel * self.mask
        if self.weight_bits is None:
            return kernel

        def quant(kernel, bits):
            return quantize(kernel, bits, symmetric=self.weight_symmetric, channel_axis=self.channel_axis,
                            group_size=self.group_size)

        bits = self.weight_bits[...]
        for _ in range(jnp.ndim(bits)):  # stacked blocks: scales per block, never across the stack
            quant = jax.vmap(quant)
        return quant(kernel, bits)

    def quantize_input(self, x):
        """The layer input fake-quantized at ``act_bits`` (unchanged if None)."""
        stats = getattr(self, "calibration_stats", None)
        if stats is not None:  # calibrating: record the input, leave it unquantized
            record(stats, x)
            return x
        if self.act_bits is None:
            return x
        if self.act_ranges == "static":
            lo_hi = self.act_range[...]
            if not isinstance(lo_hi, jax.core.Tracer) and bool(jnp.isnan(lo_hi).any()):
                raise RuntimeError(
                    f"{type(self).__name__} uses static activation scales but was never "
                    "calibrated: run fraqat_jax.calibrate(model, batches) first"
                )
            return static_fake_quant(x, lo_hi[0], lo_hi[1], self.act_bits)
        axes = token_axes(x.ndim) if self.act_granularity == "token" else None
        return quantize(x, self.act_bits, symmetric=False, channel_axis=axes)

    def input_codes(self, x):
        """Activation codes for the integer path: ``(codes, scale, zero)``, float32, asymmetric."""
        if self.act_ranges == "static":
            lo_hi = self.act_range[...]
            return static_codes(x, lo_hi[0], lo_hi[1], self.act_bits)
        axes = token_axes(x.ndim) if self.act_granularity == "token" else None
        return quantize_codes(x, self.act_bits, symmetric=False, channel_axis=axes)

    def _forward(self, base_cls, inputs, *args, **kwargs):
        x = self.quantize_input(inputs)
        view = KernelView(self, kernel=self.quantized_kernel(), mask=None)
        return base_cls.__call__(view, x, *args, **kwargs)


class QuantLinear(QuantMixin, nnx.Linear):
    KIND = "Linear"
    DEFAULT_ACT_GRANULARITY = "token"

    def __call__(self, inputs, out_sharding=None):
        return self._forward(nnx.Linear, inputs, out_sharding=out_sharding)


class QuantConv(QuantMixin, nnx.Conv):
    KIND = "Conv"
    DEFAULT_ACT_GRANULARITY = "tensor"

    def __call__(self, inputs, out_sharding=None):
        return self._forward(nnx.Conv, inputs, out_sharding=out_sharding)


class QuantEinsum(QuantMixin, nnx.Einsum):
    KIND = "Einsum"
    DEFAULT_ACT_GRANULARITY = "tensor"

    def __call__(self, inputs, einsum_str=None, out_sharding=None):
        return self._forward(nnx.Einsum, inputs, einsum_str, out_sharding=out_sharding)



#: Original layer type -> quantized type. Exact types only: a subclass of ``nnx.Linear`` with its
#: own ``__call__`` would lose its behaviour if swapped.
QUANTIZED_TYPES: dict[type, type] = {nnx.Linear: QuantLinear, nnx.Conv: QuantConv, nnx.Einsum: QuantEinsum}
QUANT_LAYERS = (QuantLinear, QuantConv, QuantEinsum)


def kind_of(layer: Any) -> str | None:
    """'Linear', 'Conv' or 'Einsum' for a quantizable or quantized layer, else None."""
    if isinstance(layer, QUANT_LAYERS):
        return layer.KIND
    cls = QUANTIZED_TYPES.get(type(layer))
    return None if cls is None else cls.KIND
