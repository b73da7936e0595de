"""The serving form: integer weight codes and an integer matmul ("what you train is what you serve").

:func:`freeze` turns each :class:`QuantLinear` / :class:`QuantConv` into a :class:`FrozenLinear` /
:class:`FrozenConv` that holds, in place of the float ``kernel``:

* ``kernel_codes`` (:class:`Codes`): the integer codes of the kernel at the layer's current bit-width.
  At <= 4 bits two codes are packed per ``uint8`` (low nibble = even flat index, high nibble = odd,
  two's complement; ONNX's INT4 layout); at 5..8 bits (fractional widths included: INT5.5 codes lie
  in [-22, 21]) one ``int8`` per code. We pack into uint8 rather than use ``jnp.int4`` because uint8
  has the same byte count in every checkpoint format (orbax, numpy, safetensors have no int4).
* ``kernel_scale`` (:class:`Scale`, float32) and, for asymmetric weights only, ``kernel_zero``:
  the scale layout of ``fraqat_jax.quant.quantize_codes`` (per tensor, per output channel or per
  group). Asymmetric codes are stored shifted by 8 (nibbles) or 128 (int8) to be signed; the zero
  absorbs the shift.
* ``kernel_code_sums`` (int32, (groups, out)): column sums of the codes, for the activation
  zero-point term (only when the input is quantized), so serving reads the weights once.
* ``bias`` (the same ``nnx.Param``) and, for static activations, ``act_range``.

Forward pass with a quantized input (``act_bits`` <= 8, asymmetric, shifted by 128 to int8)::

    x = s_x * q_x + z_x          W = s_w * q_w + z_w      (per group G of the contraction)
    x W = sum_G s_w (s_x q_x.q_w + z_x sum q_w) + z_w (s_x sum q_x + z_x g)

``q_x . q_w`` is an integer matmul; the float scales are applied once per output (per output and
group with ``group_size``). With a static (calibrated) range the input's zero lies on the grid,
``z_x = s_x o`` with an integer ``o = 128 - zero_point``, and the layer computes
``s_w (s_x (q_x.q_w + o sum q_w))``: the bracket is an exact integer and two products round it. The
codes are ``round(x * (1 / s_x)) + zero_point`` (:func:`fraqat_jax.quant.grid_codes`). An exported
graph rewritten by ``fraqat_jax.export.cpu_graph.exact_products`` computes the same steps, so
onnxruntime's CPU gives the frozen student's bits for each such layer without a bias. A following
add (a bias, a residual) can differ in its last bit: XLA:CPU fuses a product into the add after it
as one fused multiply-add (one rounding where the graph has two), and neither an optimization
barrier nor ``reduce_precision`` stops it. With ``act_bits=None`` the input stays float and
multiplies the codes.
Three forms compute ``q_x . q_w`` (:attr:`FrozenLinear.matmul`; ``"auto"`` picks, when lowered for
CPU, the fused form with at most :data:`FUSED_MAX_TOKENS` input rows (0: never, see below) and the
blocked form with at most :data:`BLOCKED_MAX_TOKENS`, decoding's regime, through
``lax.platform_dependent``, and the dense form otherwise):

* ``"dense"`` (accelerators): the codes unpacked to int8 and one int8 x int8 matmul accumulating in
  int32 (``preferred_element_type``).
* ``"blocked"`` (CPU): a scan over blocks of kernel rows; each block's codes are widened to float32
  (packed nibbles split into the even and odd output columns, so nothing is interleaved) and
  multiplied by a float32 dot. XLA:CPU fuses neither the unpacking nor a widening into a dot, so at
  few input rows the dense form writes and reads a kernel-sized array at every call; the blocked
  form reads the stored codes once and keeps each widened block in cache. With many input rows the
  widening is shared by all of them and the dense form's large matmul is the faster one. With
  quantized inputs the float32 sums are exact integers while every partial sum stays below 2**24
  (contraction group ``g`` times 128 times the largest code: ``g < 16384`` for packed codes,
  ``g < 1024`` for int8 codes), so all forms give the same bits; past that bound the CPU uses the
  dense form too.
* ``"fused"`` (CPU, one input row): a loop over blocks of kernel rows whose step is a single
  elementwise fusion, ``acc + sum_r x[r] * codes[r]``, each code widened to float32 inside the sum,
  with the output columns split into chunks laid out as the outer dimension. Nothing widened is
  written to memory, and XLA:CPU divides such a loop fusion between its threads, where the blocked
  form's per-block dots are too small to be divided and run on one core. Each input row widens the
  codes again, so with more rows the blocked form's shared widening is the faster one. Every block
  is a point where the threads wait for each other: when another process holds a core, the split
  waits at each one, so ``"auto"`` does not pick this form; set ``matmul = "fused"`` where the cores
  are free (``benchmarks/decode_layer.py`` and ``benchmarks/generate.py`` compare the two).

On TPU the dense form's unpacking of packed ``uint8`` nibbles (shifts, an interleave) is not fused
into the matmul: XLA writes the unpacked kernel out and reads it back at every call. Codes held as
``jnp.int4`` (``freeze(..., int4=True)``) are stored two per byte by XLA itself and read by the
matmul directly (int8 x int4 on the matrix unit), so that is the accelerator layout; on CPU XLA
widens ``int4`` values slowly. There (:func:`cpu_layout`) a frozen layer also holds its packed codes
unpacked once, one ``int8`` each (``kernel_unpacked``, derived, never exported), which the blocked
and fused forms widen faster than nibble pairs: 1.5 bytes per weight in memory, and 1.02x-1.12x the
float32 teacher's decode speed on a ~100 M-parameter Gemma-2 where the packed codes gave 0.89x-0.93x
(``benchmarks/generate.py --rows ours_float ours_w4a8 ours_w4a8_packed``).

Agreement with the fake-quant model: the codes are those of ``quantize_codes`` at the same bits,
so the two differ only by float32 rounding order. Tests check ``|frozen - fake| <= 1e-4 * max|fake|``
for float32 models.

Supported: Linear with symmetric or asymmetric weights, per tensor / per channel / per group, and
any activation granularity; Conv with symmetric weights, per tensor or per output channel
(``channel_axis=-1``), activations per tensor, static or unquantized. Other cases (einsum layers,
asymmetric conv weights, weight bits above 8) raise an error naming the layer. Layers whose weights
are full precision stay as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from fraqat_jax.nn.code_matmul import (  # noqa: F401  (re-exported: the forms' names live here too)
    EXACT_FLOAT_SUM, FUSED_CHUNKS, FUSED_MIN_WIDTH, FUSED_ROWS, block_rows, blocked_code_matmul, exact_in_float32,
    fused_code_matmul)
from fraqat_jax.nn.graph import path_string, replace_child, walk_to
from fraqat_jax.nn.layers import KernelView, QuantConv, QuantEinsum, QuantLinear, QuantMixin, identity_promote
from fraqat_jax.quant import grid_codes, quantize_codes


class Codes(nnx.Variable):
    """Integer weight codes (packed uint8 nibbles or int8)."""


class DerivedKernel(nnx.Variable):
    """A float kernel rebuilt from the codes once (the float path's ``codes * scale``); derived
    state, never stored in an export."""


class UnpackedCodes(nnx.Variable):
    """Packed nibbles unpacked once to one ``int8`` per code, for the CPU forms (see
    :class:`FrozenLinear`); derived state, never stored in an export."""


class Scale(nnx.Variable):
    """Float32 quantization scales (or zero offsets) of frozen weights."""


def pack_nibbles(codes) -> jax.Array:
    """Packs signed codes in [-8, 7] (any shape) two per uint8 along the flattened array."""
    flat = jnp.asarray(codes, jnp.int32).reshape(-1)
    if flat.size % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int32)])
    lo, hi = flat[0::2] & 0xF, flat[1::2] & 0xF
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_nibbles(packed, shape) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: int8 codes of ``shape``."""
    lo = lax.shift_left(packed, jnp.uint8(4)).astype(jnp.int8) >> 4
    hi = packed.astype(jnp.int8) >> 4
    size = int(np.prod(shape))
    return jnp.stack([lo, hi], axis=-1).reshape(-1)[:size].reshape(shape)


@functools.partial(jax.jit, static_argnames=("symmetric", "channel_axis", "group_size", "packed"))
def _stored_codes(kernel, bits, *, symmetric, channel_axis, group_size, packed):
    """Codes as stored (shifted to signed when asymmetric; packed nibbles or int8), scale, zero."""
    codes, scale, zero = quantize_codes(kernel, bits, symmetric=symmetric, channel_axis=channel_axis,
                                        group_size=group_size)
    if not symmetric:
        shift = 8.0 if packed else 128.0
        codes = codes - shift
        zero = zero + shift * scale
    return (pack_nibbles(codes) if packed else codes.astype(jnp.int8)), scale, zero


def _out_dtype(layer, x):
    if layer.dtype is not None:
        return layer.dtype
    bias_dtype = [] if layer.bias is None else [layer.bias.dtype]
    return jnp.result_type(x.dtype, layer.param_dtype, *bias_dtype)


class _Frozen(nnx.Module):
    """Shared construction: integer codes + scales from a quantized layer."""

    def _freeze_weights(self, layer: QuantMixin, path: str, *, allow_asymmetric: bool, int4: bool = False):
        bits = float(layer.weight_bits[...])
        if bits > 8:
            raise ValueError(f"freeze: layer {path!r} has weight bits {bits:g}; frozen codes need <= 8 bits")
        if not layer.weight_symmetric and not allow_asymmetric:
            raise ValueError(
                f"freeze: layer {path!r} ({type(layer).__name__}) has asymmetric weights, which the "
                "integer convolution does not support; quantize it with symmetric=True"
            )
        kernel = layer.kernel[...]
        if getattr(layer, "mask", None) is not None:
            kernel = kernel * layer.mask
        self.packed = bits <= 4
        codes, scale, zero = _stored_codes(kernel, bits, symmetric=layer.weight_symmetric,
                                           channel_axis=layer.channel_axis, group_size=layer.group_size,
                                           packed=self.packed)
        self.weight_bits = bits
        self.kernel_shape = tuple(kernel.shape)
        self.int4 = bool(int4 and self.packed)
        if self.int4:  # the same nibbles as one jnp.int4 per code (XLA packs them two per byte)
            codes, self.packed = unpack_nibbles(codes, self.kernel_shape).astype(jnp.int4), False
        self.kernel_codes = Codes(codes)
        self.kernel_scale = Scale(scale)
        self.kernel_zero = None if layer.weight_symmetric else Scale(zero)
        self.bias = layer.bias
        self.act_bits = layer.act_bits
        self.act_granularity = layer.act_granularity
        self.act_ranges = layer.act_ranges
        self.act_range = layer.act_range
        self.dtype = layer.dtype
        self.param_dtype = layer.param_dtype

    def weight_codes(self) -> jax.Array:
        """int8 codes of the kernel's shape."""
        codes = self.kernel_codes[...]
        return unpack_nibbles(codes, self.kernel_shape) if self.packed else codes.astype(jnp.int8)

    def input_codes(self, x):
        """int8 activation codes and float32 ``(scale, zero)`` with the 128 shift absorbed."""
        codes, scale, zero = QuantMixin.input_codes(self, x)
        return (codes - 128.0).astype(jnp.int8), scale, zero + 128.0 * scale

    def grid_input(self, x):
        """Static ranges: int8 codes ``q``, float32 scale ``s`` and integer offset ``o = 128 -
        zero_point`` (float32), the input being ``s * (q + o)``; the codes are the exported graph's
        (:func:`fraqat_jax.quant.grid_codes`: ``round(x * (1 / s)) + zero_point``)."""
        lo_hi = self.act_range[...]
        codes, scale, zero = grid_codes(x, lo_hi[0], lo_hi[1], self.act_bits)
        return (codes - 128.0).astype(jnp.int8), scale, 128.0 - zero


def _groups_by_out(a):
    """Scales of ``quantize_codes`` ((1, 1), (1, out) or (G, 1, out)) as (G or 1, out or 1)."""
    return a.reshape(-1, a.shape[-1])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def code_sums(stored, shape, group, packed):
    """Column sums of a kernel's codes per contraction group, int32 ``(shape[0] // group, shape[1])``;
    ``stored`` as in ``kernel_codes`` (packed nibbles when ``packed``)."""
    codes = unpack_nibbles(stored, shape) if packed else stored
    return codes.astype(jnp.int32).reshape(shape[0] // group, group, shape[1]).sum(1)


def _grouped_matmul(x, w, preferred):
    """``(..., G, g) x (G, g, out) -> (..., G, out)``; a plain matmul when G == 1 (faster on CPU)."""
    if w.shape[0] == 1:
        y = lax.dot_general(x[..., 0, :], w[0], (((x.ndim - 2,), (0,)), ((), ())),
                            preferred_element_type=preferred)
        return y[..., None, :]
    return jnp.einsum("...Gi,Gio->...Go", x, w, preferred_element_type=preferred)


def cpu_layout() -> bool:
    """Whether a frozen linear layer at <= 4 bits also holds its codes unpacked, one ``int8`` each
    (:class:`UnpackedCodes`, derived: exports store the packed nibbles only): when JAX's default
    backend is the CPU. There the blocked and fused forms widen each code to float32 at every call,
    and widening an ``int8`` is cheaper than splitting a nibble pair: on the ~100 M-parameter
    Gemma-2 of ``benchmarks/generate.py`` the unpacked codes decode 15-20% faster than the
    packed ones (its ``ours_w4a8_packed`` row compares both). The cost is memory: 1.5 bytes per
    weight in place of 0.5 (float32: 4). Unpacking happens once, when the layer is frozen or loaded,
    never per call."""
    return jax.default_backend() == "cpu"


FUSED_MAX_TOKENS = 0  # "auto" runs the fused form on CPU up to this many tokens (rows of the input)
MATMUL_FORMS = ("auto", "blocked", "dense", "fused")
BLOCKED_MAX_TOKENS = 32  # "auto" runs the blocked form on CPU up to this many tokens (rows of the input)


class FrozenLinear(_Frozen):
    """Serving form of :class:`QuantLinear` (see the module docstring).

    ``integer=True``: the int8 x int8 -> int32 matmul of the module docstring. ``integer=False``: the
    fake-quant student's own float arithmetic on the stored codes (the kernel rebuilt as
    ``codes * scale``, the input quantized by the same function, the same ``nnx.Linear`` call), so the
    output equals the trained student's bit for bit (symmetric weights). The integer path agrees with
    it per layer within float32 rounding, but through a deep model a rounding difference can move a
    later layer's activation code by one step (about 5e-3 of max |output| seen on the digits DiT).

    ``matmul`` (a plain attribute, settable after freezing): how the integer path multiplies the
    codes, one of :data:`MATMUL_FORMS` (see the module docstring); ``"auto"`` is, when lowered for
    CPU, ``"fused"`` with at most :data:`FUSED_MAX_TOKENS` input rows and ``"blocked"`` with at most
    :data:`BLOCKED_MAX_TOKENS`, and ``"dense"`` otherwise.
    The float path holds its rebuilt kernel (``kernel_float``), computed once when the layer is built
    (or loaded), not at every call.
    """

    _LINEAR_CONFIG = ("promote_dtype", "dot_general", "precision", "preferred_element_type", "use_bias")

    def __init__(self, layer: QuantLinear, path: str = "", *, integer: bool = True, int4: bool = False,
                 unpack: bool | None = None):
        self._freeze_weights(layer, path, allow_asymmetric=True, int4=int4)
        self.integer = integer
        self.matmul = "auto"
        for name in self._LINEAR_CONFIG:
            setattr(self, name, nnx.static(getattr(layer, name)))
        self.group_size = layer.group_size
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        # Per (group, output) sums of the weight codes, for the activation zero-point term; stored
        # so that serving reads the weights once.
        self.kernel_code_sums = None if self.act_bits is None else Codes(
            code_sums(self.kernel_codes[...], self.kernel_shape, self.group_size or self.kernel_shape[0],
                       self.packed))
        self.kernel_float = None if integer else DerivedKernel(self.fake_quant_kernel())
        unpack = cpu_layout() if unpack is None else unpack
        self.kernel_unpacked = UnpackedCodes(self.unpacked_codes()) if integer and self.packed and unpack else None

    def unpacked_codes(self) -> jax.Array:
        """The packed codes as int8 (the CPU forms' operand, see :func:`cpu_layout`)."""
        return unpack_nibbles(self.kernel_codes[...], self.kernel_shape)

    def fake_quant_kernel(self) -> jax.Array:
        """The kernel as the fake-quant student saw it, rebuilt from the codes (``codes * scale + zero``
        in the scales' layout, exactly as ``fraqat_jax.quantize`` computes it for symmetric weights)."""
        codes = self.weight_codes().astype(jnp.float32)
        n_in, n_out = self.kernel_shape
        scale = self.kernel_scale[...]
        if self.group_size:
            codes = codes.reshape(n_in // self.group_size, self.group_size, n_out)
        zero = jnp.zeros_like(scale) if self.kernel_zero is None else self.kernel_zero[...]
        return (codes * scale + zero).reshape(self.kernel_shape).astype(self.param_dtype)

    def codes_matmul(self, xg) -> jax.Array:
        """``xg (..., G, g)`` (int8 activation codes, or float inputs) times the kernel codes grouped
        as ``(G, g, out)`` -> ``(..., G, out)`` float32, in the form :attr:`matmul` names; with
        integer codes the result holds the exact integer sums."""
        if self.matmul not in MATMUL_FORMS:
            raise ValueError(f"FrozenLinear.matmul is {self.matmul!r}; allowed: {', '.join(MATMUL_FORMS)}")
        n_in, n_out = self.kernel_shape
        n_groups, g = xg.shape[-2:]
        integer = jnp.issubdtype(xg.dtype, jnp.integer)
        lead = xg.shape[:-2]

        def dense(xg, stored, packed):
            codes = (unpack_nibbles(stored, self.kernel_shape) if packed else stored.astype(jnp.int8))
            codes = codes.reshape(n_groups, g, n_out)
            if integer:
                return _grouped_matmul(xg, codes, jnp.int32).astype(jnp.float32)
            return _grouped_matmul(xg, codes.astype(jnp.float32), None)

        stored = self.kernel_codes[...]
        unpacked = self.kernel_unpacked is not None
        # What the CPU forms read (and the dense form on a CPU-held model, sparing its unpacking too).
        codes, packed = (self.kernel_unpacked[...], False) if unpacked else (stored, self.packed)

        def cpu_form(form):
            def run(xg, codes):
                flat = xg.astype(jnp.float32).reshape(tokens, n_groups, g)
                return form(flat, codes, self.kernel_shape, packed).reshape(*lead, n_groups, n_out)
            return run

        small = self.packed or self.int4  # codes of at most 4 bits, whatever their layout
        possible = (not integer or exact_in_float32(g, small)) and not (packed and n_out % 2)
        # Symbolic leading sizes (jax.export) take the dense form: the blocks need a concrete row count.
        tokens = int(np.prod(lead)) if all(isinstance(d, int) for d in lead) else None
        possible = possible and tokens is not None
        if self.matmul == "dense" or not possible or (self.matmul == "auto" and tokens > BLOCKED_MAX_TOKENS):
            return dense(xg, codes, packed)
        if self.matmul in ("blocked", "fused"):
            return cpu_form(blocked_code_matmul if self.matmul == "blocked" else fused_code_matmul)(xg, codes)
        cpu = cpu_form(fused_code_matmul if tokens <= FUSED_MAX_TOKENS else blocked_code_matmul)
        return lax.platform_dependent(xg, stored, codes, cpu=lambda xg, stored, codes: cpu(xg, codes),
                                      default=lambda xg, stored, codes: dense(xg, stored, self.packed))

    def __call__(self, x):
        if not self.integer:
            x_q = QuantMixin.quantize_input(self, x)
            return nnx.Linear.__call__(KernelView(self, kernel=self.kernel_float[...]), x_q)
        n_in, n_out = self.kernel_shape
        g = self.group_size or n_in
        n_groups = n_in // g
        sw = _groups_by_out(self.kernel_scale[...])
        zw = None if self.kernel_zero is None else _groups_by_out(self.kernel_zero[...])
        lead = x.shape[:-1]
        if self.act_bits is None:
            xg = x.astype(jnp.float32).reshape(*lead, n_groups, g)
            y = self.codes_matmul(xg) * sw
            if zw is not None:
                y = y + xg.sum(-1, keepdims=True) * zw
        else:
            # Static ranges: x = s_x (q_x + o) with an integer offset o, so the brackets below hold
            # exact integers and two products round them, as the exported graph computes a product.
            # Dynamic ranges: x = s_x q_x + z_x with a float zero.
            static = self.act_ranges == "static"
            qx, sx, zx = self.grid_input(x) if static else self.input_codes(x)
            sx = jnp.broadcast_to(sx, (*lead, 1)) if sx.ndim else sx
            zx = jnp.broadcast_to(zx, (*lead, 1)) if zx.ndim else zx
            sx, zx = sx[..., None], zx[..., None]  # (..., 1, 1) against (..., G, out)
            xg = qx.reshape(*lead, n_groups, g)
            acc = self.codes_matmul(xg)
            col = self.kernel_code_sums[...].astype(jnp.float32)  # (G, out)
            y = sw * (sx * (acc + zx * col)) if static else sw * (sx * acc + zx * col)
            if zw is not None:
                row = xg.astype(jnp.int32).sum(-1, keepdims=True).astype(jnp.float32)
                y = y + zw * (sx * (row + zx * g) if static else sx * row + zx * g)
        y = y.sum(-2)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(_out_dtype(self, x))


_CONV_CONFIG = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation",
                "feature_group_count", "in_features", "out_features", "precision", "conv_general_dilated")


class FrozenConv(_Frozen):
    """Serving form of :class:`QuantConv` (see the module docstring)."""

    def __init__(self, layer: QuantConv, path: str = ""):
        out_axes = (None, -1 % layer.kernel.ndim)
        axis = layer.channel_axis
        if axis is not None and not (isinstance(axis, int) and axis % layer.kernel.ndim == out_axes[1]):
            raise ValueError(
                f"freeze: conv layer {path!r} has channel_axis={axis!r}; the integer convolution needs "
                "one scale per tensor (None) or per output channel (-1)"
            )
        self._freeze_weights(layer, path, allow_asymmetric=False)
        # The Flax Conv configuration, so the original forward runs on the integer codes.
        for name in _CONV_CONFIG:
            setattr(self, name, getattr(layer, name))

    def _conv(self, x, kernel, preferred):
        view = KernelView(self, kernel=kernel, kernel_shape=self.kernel_shape, mask=None, bias=None,
                     use_bias=False, dtype=None, promote_dtype=identity_promote,
                     preferred_element_type=preferred)
        return nnx.Conv.__call__(view, x)

    def __call__(self, x):
        qw = self.weight_codes()
        sw = self.kernel_scale[...].reshape(-1)
        if self.act_bits is None:
            y = sw * self._conv(x.astype(jnp.float32), qw.astype(jnp.float32), None)
        else:
            static = self.act_ranges == "static"
            qx, sx, zx = self.grid_input(x) if static else self.input_codes(x)
            acc = self._conv(qx, qw, jnp.int32).astype(jnp.float32)
            n_batch = x.ndim - (len(self.kernel_shape) - 1)
            ones = jnp.ones((1,) + x.shape[n_batch:], jnp.float32)
            window = self._conv(ones, qw.astype(jnp.float32), None)  # sum of codes under each window
            if static:  # zx is the integer offset: exact sums, then two products (see FrozenLinear)
                y = sw * (sx.reshape(()) * (acc + zx.reshape(()) * window))
            else:
                y = sw * (sx.reshape(()) * acc + zx.reshape(()) * window)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(_out_dtype(self, x))


FROZEN_TYPES = {QuantLinear: FrozenLinear, QuantConv: FrozenConv}


def freeze(model: nnx.Module, *, integer: bool = True, int4: bool = False, unpack: bool | None = None) -> nnx.Module:
    """The serving form of a quantized model: a copy whose quantized layers hold integer codes.

    ``integer``: linear layers multiply integer codes (int8 x int8 -> int32); False computes with the
    fake-quant student's float arithmetic on the same codes, equal to the student bit for bit (see
    :class:`FrozenLinear`).

    ``int4``: linear layers at <= 4 bits hold their codes as ``jnp.int4`` arrays (the accelerator
    layout, see the module docstring) instead of packed ``uint8``; the values and outputs are the
    same. Exports and ONNX read the packed layout, so they freeze without it.

    ``unpack``: packed layers also hold their codes unpacked to ``int8`` for the CPU forms (derived,
    not exported); ``None`` (default) does so when JAX's default backend is the CPU (see
    :func:`cpu_layout`).

    The input model is left unchanged. Each :class:`QuantLinear` / :class:`QuantConv` with quantized
    weights becomes a :class:`FrozenLinear` / :class:`FrozenConv` at its current (concrete) weight
    bit-width; layers with full-precision weights and all other modules are kept. Raises
    ``NotImplementedError`` for a :class:`QuantEinsum` with quantized weights and ``ValueError`` for
    unsupported settings (see the module docstring), naming the layer.
    """
    model = nnx.clone(model)
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantEinsum) and node.weight_bits is not None:
            raise NotImplementedError(
                f"freeze: einsum layer {path_string(path)!r} has quantized weights; only Linear and "
                "Conv layers have a frozen integer form"
            )
        if type(node) in FROZEN_TYPES and node.weight_bits is not None:
            targets.append((path, node))
    for path, layer in targets:
        name = path_string(path)
        frozen = (FrozenLinear(layer, name, integer=integer, int4=int4, unpack=unpack) if type(layer) is QuantLinear
                  else FROZEN_TYPES[type(layer)](layer, name))
        if not path:
            return frozen
        replace_child(walk_to(model, path), path[-1], frozen, name)
    return model
