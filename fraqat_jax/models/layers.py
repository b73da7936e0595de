"""Building blocks shared by the diffusion-transformer ports (DiT, SD3, PixArt, Sana, Flux).

Every module mirrors a diffusers module of the same name so that the NNX parameter path equals
the diffusers state-dict key with ``weight`` renamed (``kernel`` for Linear/Conv, ``scale`` for
norms, ``embedding`` for embedding tables). Linear layers are plain ``nnx.Linear`` and convolutions
plain ``nnx.Conv`` so ``fraqat_jax.quantize_model`` finds them.

Conventions
- Activations are channels-last: tokens ``[B, N, D]``; images enter ports as ``[B, C, H, W]``
  (diffusers layout) and ``PatchEmbed`` turns them into tokens.
- ``dtype`` is the compute dtype (``None``: follow the inputs/params, as Flax does),
  ``param_dtype`` the storage dtype of parameters. Norm statistics, softmax and sinusoidal
  embeddings are computed in float32 whatever ``dtype`` is.
- Parameters carry logical sharding names in their ``out_sharding`` metadata
  (``embed``, ``mlp``, ``heads``, ``vocab``, ``norm``); map them to mesh axes with
  ``flax.linen.logical_axis_rules`` + ``nnx.get_partition_spec``. Construction never shards
  eagerly (see ``no_eager_sharding``), so models build without a mesh.
- Random init follows torch's defaults (what a freshly built diffusers model has): Linear/Conv
  kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings ~ N(0, 1). ``zero=True``
  gives the adaLN-Zero initialisation (zero kernel and bias) used for modulation and output
  layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# Logical axis names used on parameters.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
VOCAB = "vocab"
NORM = "norm"


class Buffer(nnx.Variable):
    """A non-trainable array saved in diffusers checkpoints (a persistent torch buffer,
    e.g. SD3's ``pos_embed.pos_embed``). Not an ``nnx.Param``: optimizers and parameter counts
    skip it, the loader fills it."""


def no_eager_sharding():
    """Context in which ports build their parameters: logical names are recorded as metadata
    only; placing them on a mesh is the trainer's job."""
    return nnx.use_eager_sharding(False)


class KeySequence:
    """Stand-in for ``nnx.Rngs`` while a port builds its layers: ``params()`` folds a Python
    counter into one key. ``nnx.Rngs`` keeps its counter in a Variable, and updating that under
    ``nnx.eval_shape`` makes JAX format an error message per draw (seconds for SD3.5-Medium);
    this keeps abstract construction cheap. Deterministic for a given ``rngs`` state."""

    def __init__(self, rngs: "nnx.Rngs | KeySequence"):
        self.key = rngs.params()
        self.count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key

    __call__ = params


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = (EMBED, MLP),
    zero: bool = False,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """``nnx.Linear`` with torch's default init (or zeros) and logical names ``axes`` on the
    kernel ``[in_features, out_features]``; the bias ``[out_features]`` gets ``axes[1]``."""
    zeros = nnx.initializers.zeros_init()
    with no_eager_sharding():
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=zeros if zero else _torch_kernel_init,
            bias_init=zeros if zero else _torch_bias_init(in_features),
            kernel_metadata={"out_sharding": tuple(axes)},
            bias_metadata={"out_sharding": (axes[1],)},
            rngs=rngs,
        )


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps diffusers' list indices (e.g. the Dropout at
    ``ff.net.1`` and ``attn.to_out.1``; dropout is 0 in every model ported here)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (torch ``nn.LayerNorm`` semantics).

    ``elementwise_affine`` adds ``scale`` (diffusers ``weight``) and, if ``bias``, ``bias``,
    both ``[dim]``. Input ``[..., dim]`` -> output of the same shape in ``dtype`` (or the input's).
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        with no_eager_sharding():
            self.scale = (
                nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine
                else None
            )
            self.bias = (
                nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine and bias
                else None
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (diffusers ``RMSNorm``): ``x / sqrt(mean(x^2) + eps) * scale``.

    Mean of squares in float32. ``scale`` is ``[dim]`` (diffusers ``weight``), absent when
    ``elementwise_affine=False``. Input ``[..., dim]`` -> same shape.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        with no_eager_sharding():
            self.scale = (
                nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine
                else None
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Sinusoidal embeddings
# ----------------------------------------------------------------------------------------------


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features (diffusers ``get_timestep_embedding``).

    ``timesteps``: ``[B]`` (may be fractional) -> ``[B, dim]`` float32, ``[sin, cos]`` halves
    (``[cos, sin]`` if ``flip_sin_to_cos``), zero-padded when ``dim`` is odd.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, pos: jax.Array) -> jax.Array:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * jnp.asarray(omega, jnp.float32)[None, :]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    *,
    base_size: float = 16,
    interpolation_scale: float = 1.0,
) -> jax.Array:
    """2-D sin-cos position table (diffusers ``get_2d_sincos_pos_embed``).

    ``grid_size`` ``(h, w)`` -> ``[h * w, embed_dim]`` float32, row-major over (h, w); the first
    half of the channels encodes the column (w) coordinate, the second half the row (h).
    Computed with jnp in float32 (diffusers uses float64 for the angles; the difference is
    ~1e-6), so it costs nothing under ``nnx.eval_shape`` even for SD3.5's 384x384 table.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(gh, dtype=np.float32) / np.float32(gh / base_size) / np.float32(interpolation_scale)
    grid_w = np.arange(gw, dtype=np.float32) / np.float32(gw / base_size) / np.float32(interpolation_scale)
    # diffusers' later reshape to [2, 1, gw, gh] only relabels axes: the order stays row-major.
    w_coord, h_coord = jnp.meshgrid(jnp.asarray(grid_w), jnp.asarray(grid_h), indexing="xy")
    return jnp.concatenate([_sincos_1d(embed_dim // 2, w_coord), _sincos_1d(embed_dim // 2, h_coord)], axis=1)


class PatchEmbed(nnx.Module):
    """Image -> patch tokens plus 2-D sin-cos positions (diffusers ``PatchEmbed``).

    ``proj`` is an ``nnx.Conv`` with kernel ``[p, p, in_channels, embed_dim]`` (HWIO) and stride p.
    With ``pos_embed_max_size`` (SD3) the table ``pos_embed`` ``[1, M*M, D]`` is a persistent
    ``Buffer`` loaded from checkpoints and centre-cropped to the input size; otherwise
    (DiT, PixArt) the table is a constant recomputed for the input's grid.

    Call: ``latent [B, C, H, W]`` -> ``[B, (H/p)*(W/p), D]``.
    """

    def __init__(
        self,
        *,
        height: int = 224,
        width: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        layer_norm: bool = False,
        bias: bool = True,
        interpolation_scale: float = 1.0,
        pos_embed_type: str | None = "sincos",
        pos_embed_max_size: int | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if pos_embed_type not in (None, "sincos"):
            raise ValueError(f"Unsupported pos_embed_type {pos_embed_type!r}; supported: None, 'sincos'")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.height, self.width = height // patch_size, width // patch_size
        self.base_size = height // patch_size
        self.interpolation_scale = interpolation_scale
        self.pos_embed_type = pos_embed_type
        self.pos_embed_max_size = pos_embed_max_size
        self.dtype = dtype
        fan_in = in_channels * patch_size * patch_size
        with no_eager_sharding():
            self.proj = nnx.Conv(
                in_channels,
                embed_dim,
                kernel_size=(patch_size, patch_size),
                strides=(patch_size, patch_size),
                padding="VALID",
                use_bias=bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=_torch_kernel_init,
                bias_init=_torch_bias_init(fan_in),
                kernel_metadata={"out_sharding": (None, None, None, EMBED)},
                bias_metadata={"out_sharding": (EMBED,)},
                rngs=rngs,
            )
        self.norm = LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False, dtype=dtype) if layer_norm else None
        if pos_embed_type is not None and pos_embed_max_size:
            table = get_2d_sincos_pos_embed(
                embed_dim,
                pos_embed_max_size,
                base_size=self.base_size,
                interpolation_scale=interpolation_scale,
            )
            with no_eager_sharding():
                self.pos_embed = Buffer(table[None], out_sharding=(None, None, EMBED))
        else:
            self.pos_embed = None

    def _positions(self, h: int, w: int) -> jax.Array:
        """Position table ``[1, h*w, D]`` for a grid of ``h x w`` patches."""
        if self.pos_embed_max_size:
            m = self.pos_embed_max_size
            if h > m or w > m:
                raise ValueError(
                    f"Patch grid {h}x{w} exceeds pos_embed_max_size={m}; input must be at most "
                    f"{m * self.patch_size} pixels per side"
                )
            top, left = (m - h) // 2, (m - w) // 2
            table = self.pos_embed[...].reshape(1, m, m, -1)[:, top : top + h, left : left + w, :]
            return table.reshape(1, h * w, -1)
        table = get_2d_sincos_pos_embed(
            self.embed_dim,
            (h, w),
            base_size=self.base_size,
            interpolation_scale=self.interpolation_scale,
        )
        return table[None]

    def __call__(self, latent: jax.Array) -> jax.Array:
        b, _, hh, ww = latent.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"Input size {hh}x{ww} is not a multiple of patch_size={p}")
        x = self.proj(jnp.transpose(latent, (0, 2, 3, 1)))  # [B, h, w, D]
        h, w = hh // p, ww // p
        x = x.reshape(b, h * w, -1)
        if self.norm is not None:
            x = self.norm(x)
        if self.pos_embed_type is None:
            return x
        pos = self._positions(h, w)
        return (x.astype(jnp.float32) + pos.astype(jnp.float32)).astype(x.dtype)


def unpatchify(x: jax.Array, height: int, width: int, patch_size: int, channels: int) -> jax.Array:
    """Tokens ``[B, h*w, p*p*C]`` (row-major patches, each ``(p, p, C)``) -> image
    ``[B, C, h*p, w*p]`` with ``h = height // p``, ``w = width // p`` in patches."""
    b = x.shape[0]
    h, w = height // patch_size, width // patch_size
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    x = jnp.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * patch_size, w * patch_size)


# ----------------------------------------------------------------------------------------------
# Conditioning embeddings
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str):
    """Activation function by diffusers name (``silu``, ``gelu``, ``gelu_tanh``, ...)."""
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class TimestepEmbedding(nnx.Module):
    """MLP on timestep features (diffusers ``TimestepEmbedding``): ``linear_1 -> act -> linear_2``.

    ``[B, in_channels] -> [B, out_dim or time_embed_dim]``.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        out_dim: int | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = act_fn
        self.linear_1 = linear(in_channels, time_embed_dim, axes=(None, EMBED), **kw)
        self.linear_2 = linear(time_embed_dim, out_dim or time_embed_dim, axes=(EMBED, EMBED), **kw)

    def __call__(self, sample: jax.Array) -> jax.Array:
        return self.linear_2(get_activation(self.act_fn)(self.linear_1(sample)))


class LabelEmbedding(nnx.Module):
    """Class-label table (diffusers ``LabelEmbedding``): ``embedding_table`` is
    ``[num_classes + (dropout_prob > 0), hidden]``; the extra last row is the "no class" label used
    for classifier-free guidance (pass label ``num_classes``, or ``force_drop_ids``).

    ``labels [B] int -> [B, hidden]``.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_size: int,
        dropout_prob: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        with no_eager_sharding():
            self.embedding_table = nnx.Embed(
                num_classes + int(dropout_prob > 0),
                hidden_size,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=nnx.initializers.normal(1.0),
                embedding_metadata={"out_sharding": (VOCAB, EMBED)},
                rngs=rngs,
            )

    def __call__(self, labels: jax.Array, force_drop_ids: jax.Array | None = None) -> jax.Array:
        labels = jnp.asarray(labels)
        if force_drop_ids is not None:
            if self.dropout_prob <= 0:
                raise ValueError("force_drop_ids needs a table with a null-class row (dropout_prob > 0)")
            labels = jnp.where(jnp.asarray(force_drop_ids) == 1, self.num_classes, labels)
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nnx.Module):
    """DiT conditioning (diffusers ``CombinedTimestepLabelEmbeddings``):
    ``timestep_embedder(sincos256(t)) + class_embedder(labels)``; ``[B], [B] -> [B, dim]``."""

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        class_dropout_prob: float = 0.1,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim, class_dropout_prob, **kw)

    def __call__(self, timestep: jax.Array, class_labels: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
        t = self.timestep_embedder(t.astype(self.dtype or jnp.float32))
        return t + self.class_embedder(class_labels)


class PixArtAlphaTextProjection(nnx.Module):
    """Two-layer MLP (diffusers ``PixArtAlphaTextProjection``): ``linear_1 -> act_fn -> linear_2``.
    ``act_fn`` in {"gelu_tanh", "silu", "silu_fp32"}. ``[..., in_features] -> [..., out_features]``."""

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        out_features: int | None = None,
        *,
        act_fn: str = "gelu_tanh",
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if act_fn not in ("gelu_tanh", "silu", "silu_fp32"):
            raise ValueError(f"Unknown act_fn {act_fn!r}; supported: 'gelu_tanh', 'silu', 'silu_fp32'")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = act_fn
        self.linear_1 = linear(in_features, hidden_size, axes=(None, EMBED), **kw)
        self.linear_2 = linear(hidden_size, out_features or hidden_size, axes=(EMBED, EMBED), **kw)

    def __call__(self, caption: jax.Array) -> jax.Array:
        h = self.linear_1(caption)
        if self.act_fn == "silu_fp32":
            h = jax.nn.silu(h.astype(jnp.float32)).astype(h.dtype)
        else:
            h = get_activation(self.act_fn)(h)
        return self.linear_2(h)


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """SD3 conditioning (diffusers ``CombinedTimestepTextProjEmbeddings``):
    ``timestep_embedder(sincos256(t)) + text_embedder(pooled)``; ``[B], [B, P] -> [B, dim]``."""

    def __init__(
        self,
        embedding_dim: int,
        pooled_projection_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu", **kw)

    def __call__(self, timestep: jax.Array, pooled_projection: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        t = self.timestep_embedder(t.astype(self.dtype or pooled_projection.dtype))
        return t + self.text_embedder(pooled_projection)


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------


class GELU(nnx.Module):
    """``proj`` then GELU (tanh approximation if ``approximate == "tanh"``). ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, approximate: str = "none", bias: bool = True, **kw):
        self.approximate = approximate == "tanh"
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nnx.Module):
    """``proj`` to ``2 * dim_out`` then ``a * gelu(gate)`` (exact GELU). ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, 2 * dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class SwiGLU(nnx.Module):
    """``proj`` to ``2 * dim_out`` then ``a * silu(gate)``. ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, 2 * dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.silu(gate)


class ApproximateGELU(nnx.Module):
    """``proj`` then ``x * sigmoid(1.702 x)``. ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x * jax.nn.sigmoid(1.702 * x)


class LinearActivation(nnx.Module):
    """``proj`` then a named activation (diffusers ``LinearActivation``)."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, activation: str = "silu", **kw):
        self.activation = activation
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return get_activation(self.activation)(self.proj(x))


class FeedForward(nnx.Module):
    """Transformer MLP (diffusers ``FeedForward``): ``net.0`` activation-with-projection
    (``dim -> inner_dim``), ``net.1`` dropout placeholder, ``net.2`` Linear ``inner_dim -> dim_out``.

    ``activation_fn`` in {"gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu",
    "linear-silu"}; ``inner_dim`` defaults to ``mult * dim``. ``[..., dim] -> [..., dim_out]``.
    """

    _ACTS = {
        "gelu": lambda i, o, b, kw: GELU(i, o, bias=b, **kw),
        "gelu-approximate": lambda i, o, b, kw: GELU(i, o, approximate="tanh", bias=b, **kw),
        "geglu": lambda i, o, b, kw: GEGLU(i, o, bias=b, **kw),
        "geglu-approximate": lambda i, o, b, kw: ApproximateGELU(i, o, bias=b, **kw),
        "swiglu": lambda i, o, b, kw: SwiGLU(i, o, bias=b, **kw),
        "linear-silu": lambda i, o, b, kw: LinearActivation(i, o, bias=b, activation="silu", **kw),
    }

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        mult: float = 4,
        activation_fn: str = "geglu",
        inner_dim: int | None = None,
        bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if activation_fn not in self._ACTS:
            raise ValueError(f"Unknown activation_fn {activation_fn!r}; supported: {sorted(self._ACTS)}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = inner_dim if inner_dim is not None else int(dim * mult)
        self.net = nnx.List(
            [
                self._ACTS[activation_fn](dim, inner_dim, bias, kw),
                Identity(),
                linear(inner_dim, dim_out if dim_out is not None else dim, use_bias=bias, axes=(MLP, EMBED), **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Adaptive layer norms
# ----------------------------------------------------------------------------------------------


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` ``[B, D]`` over tokens ``[B, N, D]``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _AdaLNBase(nnx.Module):
    """``linear(silu(emb))`` split into ``n_chunks`` ``[B, dim]`` pieces; ``norm`` a LayerNorm without
    affine parameters. ``linear`` starts at zero (adaLN-Zero) unless ``zero_init=False``."""

    def __init__(self, embedding_dim: int, n_chunks: int, *, bias: bool, zero_init: bool, rngs, dtype, param_dtype,
                 cond_dim: int | None = None, eps: float = 1e-6):
        self.n_chunks = n_chunks
        self.linear = linear(
            cond_dim or embedding_dim,
            n_chunks * embedding_dim,
            use_bias=bias,
            axes=(EMBED, MLP),
            zero=zero_init,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.norm = LayerNorm(embedding_dim, eps=eps, elementwise_affine=False, dtype=dtype)

    def _chunks(self, emb: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(jax.nn.silu(emb)), self.n_chunks, axis=-1)


class AdaLayerNormZero(_AdaLNBase):
    """adaLN-Zero (diffusers ``AdaLayerNormZero``). With ``num_embeddings`` it owns its own
    ``emb`` (``CombinedTimestepLabelEmbeddings``, DiT), otherwise the caller passes ``emb [B, D]``.

    Call -> ``(x_mod [B, N, D], gate_msa, shift_mlp, scale_mlp, gate_mlp)`` each ``[B, D]``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_embeddings: int | None = None,
        *,
        bias: bool = True,
        zero_init: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.emb = (
            CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim, **kw) if num_embeddings is not None else None
        )
        super().__init__(embedding_dim, 6, bias=bias, zero_init=zero_init, **kw)

    def __call__(self, x, timestep=None, class_labels=None, *, emb=None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._chunks(emb)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class SD35AdaLayerNormZeroX(_AdaLNBase):
    """SD3.5 adaLN-Zero with a second modulation for the dual attention (diffusers
    ``SD35AdaLayerNormZeroX``). Call ``(x [B, N, D], emb [B, D])`` ->
    ``(x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_mod2, gate_msa2)``."""

    def __init__(self, embedding_dim: int, *, bias: bool = True, zero_init: bool = True, rngs: nnx.Rngs,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        super().__init__(embedding_dim, 9, bias=bias, zero_init=zero_init, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x, emb):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = self._chunks(emb)
        normed = self.norm(x)
        return (modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(normed, shift_msa2, scale_msa2), gate_msa2)


class AdaLayerNormZeroSingle(_AdaLNBase):
    """Three-way adaLN-Zero (diffusers ``AdaLayerNormZeroSingle``, Flux single blocks).
    Call ``(x [B, N, D], emb [B, D])`` -> ``(x_mod, gate_msa)``."""

    def __init__(self, embedding_dim: int, *, bias: bool = True, zero_init: bool = True, rngs: nnx.Rngs,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        super().__init__(embedding_dim, 3, bias=bias, zero_init=zero_init, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x, emb):
        shift_msa, scale_msa, gate_msa = self._chunks(emb)
        return modulate(self.norm(x), shift_msa, scale_msa), gate_msa


class AdaLayerNormContinuous(nnx.Module):
    """Continuous adaptive norm (diffusers ``AdaLayerNormContinuous``): ``linear(silu(cond))``
    gives ``scale, shift`` (in that order); ``norm`` is LayerNorm or RMSNorm.

    Call ``(x [B, N, D], conditioning_embedding [B, C])`` -> ``[B, N, D]``.
    """

    def __init__(
        self,
        embedding_dim: int,
        conditioning_embedding_dim: int,
        *,
        elementwise_affine: bool = True,
        eps: float = 1e-5,
        bias: bool = True,
        norm_type: str = "layer_norm",
        zero_init: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.linear = linear(
            conditioning_embedding_dim, 2 * embedding_dim, use_bias=bias, axes=(EMBED, MLP), zero=zero_init,
            rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )
        if norm_type == "layer_norm":
            self.norm = LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                                  dtype=dtype, param_dtype=param_dtype)
        elif norm_type == "rms_norm":
            self.norm = RMSNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype,
                                param_dtype=param_dtype)
        else:
            raise ValueError(f"Unknown norm_type {norm_type!r}; supported: 'layer_norm', 'rms_norm'")

    def __call__(self, x: jax.Array, conditioning_embedding: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(jax.nn.silu(conditioning_embedding).astype(x.dtype)), 2, axis=-1)
        return modulate(self.norm(x), shift, scale)


def count_params(model_or_state: Any) -> int:
    """Number of scalars in the ``nnx.Param`` leaves of a model or state (works on ``nnx.eval_shape``
    output, so no memory is spent)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


__all__: Sequence[str] = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "ApproximateGELU",
    "Buffer",
    "CombinedTimestepLabelEmbeddings",
    "CombinedTimestepTextProjEmbeddings",
    "FeedForward",
    "GEGLU",
    "GELU",
    "Identity",
    "KeySequence",
    "LabelEmbedding",
    "LayerNorm",
    "LinearActivation",
    "ModelConfig",
    "PatchEmbed",
    "PixArtAlphaTextProjection",
    "RMSNorm",
    "SD35AdaLayerNormZeroX",
    "SwiGLU",
    "TimestepEmbedding",
    "count_params",
    "get_2d_sincos_pos_embed",
    "call_block",
    "get_activation",
    "merge_config",
    "linear",
    "modulate",
    "no_eager_sharding",
    "timestep_embedding",
    "unpatchify",
]


def call_block(block: nnx.Module, remat: bool, *args: Any, **static: Any) -> Any:
    """``block(*args)``, rematerialised (``jax.checkpoint``: activations recomputed in the backward
    pass) when ``remat``. Positional arguments must be arrays or None; keyword arguments are
    passed through as Python constants (e.g. a token grid's height and width).

    The rematerialised call is a pure function of the block's state (split/merge around
    ``jax.checkpoint``), so it also works when the parameters are closed over by an inner
    transform (e.g. a frozen teacher called inside ``jax.grad`` over the student), where
    ``nnx.remat`` would try to write the state back across trace levels."""
    if remat:
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a, **static))(state, *args)
    return block(*args, **static)


class ModelConfig(dict):
    """A port's diffusers config: a ``dict`` (JSON-serialisable, ``cfg["num_layers"]``) that is
    read-only and hashable, so graph definitions holding it can be static arguments of ``jax.jit``."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("model config is read-only; build a new model from a modified dict(config)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self):
        return (ModelConfig, (dict(self),))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def merge_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, class_name: str) -> ModelConfig:
    """``defaults`` updated with ``config`` (diffusers keys) plus ``_class_name``, lists turned
    into tuples. Keys starting with ``_`` (diffusers bookkeeping) are kept but not used."""
    merged = dict(defaults)
    merged.update(dict(config or {}))
    merged["_class_name"] = class_name
    return ModelConfig({k: _hashable(v) if isinstance(v, list) else v for k, v in merged.items()})
