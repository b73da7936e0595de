"""Embeddings of the ports, named like diffusers' ``embeddings.py``: sinusoidal timestep and 2-D
position tables, patch embedding, timestep / label / text-projection embedders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.models.activations import get_activation
from fraqat_jax.models.common import (EMBED, VOCAB, Buffer, Dtype, LayerNorm, linear, no_eager_sharding, torch_bias_init,
                                      torch_kernel_init)

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
                kernel_init=torch_kernel_init,
                bias_init=torch_bias_init(fan_in),
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
