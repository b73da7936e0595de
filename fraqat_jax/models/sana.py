"""Sana as diffusers' ``SanaTransformer2DModel``, in Flax NNX.

Patchify (sin-cos positions optional), adaLN-single conditioning (optionally with a guidance
embedding), ReLU linear self-attention computed in float32, softmax cross-attention to the
RMS-normalised caption, and the GLUMBConv feed-forward (1x1 conv, depthwise 3x3 conv, gated, 1x1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.attention import Attention, set_attention
from fraqat_jax.models.common import (
    EMBED,
    HEADS,
    MLP,
    Identity,
    KeySequence,
    LayerNorm,
    RMSNorm,
    linear,
    merge_config,
    no_eager_sharding,
    torch_bias_init,
    torch_kernel_init,
)
from fraqat_jax.models.embeddings import (
    PatchEmbed,
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    timestep_embedding,
    unpatchify,
)
from fraqat_jax.models.pixart import (
    AdaLayerNormSingle,
    ada_single_chunks,
    cross_attention_mask,
    scale_shift_table,
)
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

SANA_DEFAULTS: dict[str, Any] = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "dropout": 0.0,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,
    "guidance_embeds": False,
    "guidance_embeds_scale": 0.1,
    "qk_norm": None,
    "timestep_scale": 1.0,
}

_QK_NORMS = (None, "rms_norm_across_heads")


def _conv(in_features: int, out_features: int, kernel: int, *, groups: int = 1, use_bias: bool = True,
          axes: tuple, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.Conv:
    """``nnx.Conv`` (NHWC, stride 1, "same" padding) with torch's default init; kernel
    ``[k, k, in/groups, out]`` carries logical names ``axes``."""
    with no_eager_sharding():
        return nnx.Conv(
            in_features,
            out_features,
            kernel_size=(kernel, kernel),
            padding="SAME",
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=torch_kernel_init,
            bias_init=torch_bias_init(in_features // groups * kernel * kernel),
            kernel_metadata={"out_sharding": axes},
            bias_metadata={"out_sharding": (axes[-1],)},
            rngs=rngs,
        )


class GLUMBConv(nnx.Module):
    """Sana's feed-forward (diffusers ``GLUMBConv``, no norm, no residual): ``conv_inverted``
    1x1 ``C -> 2h``, SiLU, ``conv_depth`` depthwise 3x3 on ``2h`` channels, split into value and
    gate halves, ``value * silu(gate)``, ``conv_point`` 1x1 ``h -> C_out`` without bias.

    Call ``x [B, H, W, C]`` (channels-last) -> ``[B, H, W, C_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 4, *, rngs: nnx.Rngs,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hidden = int(expand_ratio * in_channels)
        self.conv_inverted = _conv(in_channels, 2 * hidden, 1, axes=(None, None, EMBED, MLP), **kw)
        self.conv_depth = _conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden, axes=(None, None, None, MLP), **kw)
        self.conv_point = _conv(hidden, out_channels, 1, use_bias=False, axes=(None, None, MLP, EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        value, gate = jnp.split(x, 2, axis=-1)
        return self.conv_point(value * jax.nn.silu(gate))


class SanaLinearAttention(nnx.Module):
    """diffusers ``Attention`` with ``SanaLinearAttnProcessor2_0``: ReLU feature maps on q and k,
    then ``out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15)`` per head, in float32 whatever
    the compute dtype. Linear in the token count. Parameters ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0`` and, with ``qk_norm="rms_norm_across_heads"``, ``norm_q``/``norm_k`` over all heads.

    Call ``x [B, N, dim]`` -> ``[B, N, dim]``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, *, bias: bool, qk_norm: str | None,
                 rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        self.heads = heads
        norm = (lambda: RMSNorm(inner, eps=1e-5, dtype=dtype, param_dtype=param_dtype)) if qk_norm else (lambda: None)
        self.norm_q = norm()
        self.norm_k = norm()
        self.to_q = linear(dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
        self.to_k = linear(dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
        self.to_v = linear(dim, inner, use_bias=bias, axes=(EMBED, HEADS), **kw)
        self.to_out = nnx.List([linear(inner, dim, axes=(HEADS, EMBED), **kw), Identity()])

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        b, n, inner = q.shape

        def heads(t):
            return t.astype(jnp.float32).reshape(b, n, self.heads, inner // self.heads)

        q, k, v = jax.nn.relu(heads(q)), jax.nn.relu(heads(k)), heads(v)
        kv = jnp.einsum("bnhd,bnhe->bhde", k, v)
        numerator = jnp.einsum("bnhd,bhde->bnhe", q, kv)
        denominator = jnp.einsum("bnhd,bhd->bnh", q, k.sum(axis=1))
        out = numerator / (denominator[..., None] + 1e-15)
        return self.to_out[0](out.reshape(b, n, inner).astype(x.dtype))


class _AcrossHeadsAttention(Attention):
    """Softmax attention whose q/k RMSNorms span all heads (``qk_norm="rms_norm_across_heads"``),
    applied before the heads are split, as diffusers' Sana cross-attention does."""

    def _split(self, x: jax.Array, norm) -> jax.Array:
        return super()._split(norm(x) if norm is not None else x, None)


def _cross_attention(dim: int, cfg: Mapping[str, Any], kw: dict) -> Attention:
    heads, head_dim = cfg["num_cross_attention_heads"], cfg["cross_attention_head_dim"]
    args = dict(heads=heads, dim_head=head_dim, cross_attention_dim=cfg["cross_attention_dim"], bias=True, **kw)
    if cfg["qk_norm"] is None:
        return Attention(dim, **args)
    attn = _AcrossHeadsAttention(dim, **args)
    norm_kw = dict(eps=1e-5, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    attn.norm_q = nnx.data(RMSNorm(heads * head_dim, **norm_kw))
    attn.norm_k = nnx.data(RMSNorm(heads * head_dim, **norm_kw))
    return attn


class SanaCombinedTimestepGuidanceEmbeddings(nnx.Module):
    """Timestep + guidance-scale embedding with its adaLN-single projection (diffusers
    ``SanaCombinedTimestepGuidanceEmbeddings``).

    Call ``(timestep [B], guidance [B])`` -> ``(modulation [B, 6*dim], conditioning [B, dim])``.
    """

    def __init__(self, embedding_dim: int, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.guidance_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.linear = linear(embedding_dim, 6 * embedding_dim, axes=(EMBED, MLP), **kw)

    def __call__(self, timestep: jax.Array, guidance: jax.Array):
        def features(values):
            t = timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
            return t.astype(self.dtype or jnp.float32)

        conditioning = self.timestep_embedder(features(timestep)) + self.guidance_embedder(features(guidance))
        return self.linear(jax.nn.silu(conditioning)), conditioning


class SanaTransformerBlock(nnx.Module):
    """diffusers ``SanaTransformerBlock``: modulated ``norm1`` + linear self-attention ``attn1``,
    un-normalised cross-attention ``attn2``, modulated ``norm2`` + ``ff`` (GLUMBConv on the
    token grid), gated by ``scale_shift_table + modulation``.

    Call ``(x [B, N, D], context [B, L, D], mask [B, 1, 1, L] | None, modulation [B, 6D],
    height, width)`` with ``N = height * width`` -> ``[B, N, D]``.
    """

    def __init__(self, dim: int, cfg: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=False, dtype=dtype)
        self.attn1 = SanaLinearAttention(dim, cfg["num_attention_heads"], cfg["attention_head_dim"],
                                         bias=cfg["attention_bias"], qk_norm=cfg["qk_norm"], **kw)
        self.norm2 = LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=cfg["norm_elementwise_affine"],
                               dtype=dtype, param_dtype=param_dtype)
        self.attn2 = _cross_attention(dim, cfg, kw)
        self.ff = GLUMBConv(dim, dim, cfg["mlp_ratio"], **kw)
        self.scale_shift_table = scale_shift_table(6, dim, rngs, param_dtype)

    def __call__(self, x, context, mask, modulation, height: int, width: int):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_single_chunks(
            self.scale_shift_table, modulation, 6
        )
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context, mask)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        b, n, d = h.shape
        ff = self.ff(h.reshape(b, height, width, d)).reshape(b, n, d)
        return x + gate_mlp * ff


class SanaTransformer2DModel(nnx.Module):
    """Port of diffusers ``SanaTransformer2DModel`` (Sana 600M / 1.6B, Sana 1.5 with
    ``qk_norm="rms_norm_across_heads"``, guidance-distilled variants with ``guidance_embeds``).

    ``config``: diffusers keys (``SANA_DEFAULTS``), kept as a plain dict on ``self.config``.
    Random init follows diffusers (torch defaults; tables ``N(0, 1/dim)``).

    Call ``(hidden_states [B, C, H, W], encoder_hidden_states [B, L, caption_channels],
    timestep [B], guidance [B] | None, encoder_attention_mask [B, L] | None)`` ->
    ``[B, out_channels, H, W]``. ``guidance`` is required exactly when ``guidance_embeds``.

    ``remat``: recompute each block in the backward pass (True or a policy name, see
    ``models.scan``); ``scan_layers``: stack the blocks and run them with ``jax.lax.scan``
    (``models.scan``); ``attention``: ``"xla"``, ``"flash"`` or ``"auto"`` (``models.attention``).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        remat: bool | str = False,
        scan_layers: bool = False,
        attention: str = "xla",
    ):
        cfg = merge_config(SANA_DEFAULTS, config, "SanaTransformer2DModel")
        if cfg["qk_norm"] not in _QK_NORMS:
            raise ValueError(f"Unsupported qk_norm {cfg['qk_norm']!r}; supported: {_QK_NORMS}")
        if cfg["cross_attention_dim"] is None:
            raise ValueError("SanaTransformer2DModel needs cross_attention_dim (caption width), got None")
        self.config = cfg
        self.remat = check_remat(remat)
        self.scan_layers = scan_layers
        rngs = KeySequence(rngs)  # cheap under nnx.eval_shape (see layers.KeySequence)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.inner_dim = dim
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg["out_channels"] or cfg["in_channels"]

        self.patch_embed = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=dim,
            interpolation_scale=cfg["interpolation_scale"],
            pos_embed_type="sincos" if cfg["interpolation_scale"] is not None else None,
            **kw,
        )
        self.time_embed = (
            SanaCombinedTimestepGuidanceEmbeddings(dim, **kw)
            if cfg["guidance_embeds"]
            else AdaLayerNormSingle(dim, **kw)
        )
        self.caption_projection = PixArtAlphaTextProjection(cfg["caption_channels"], dim, **kw)
        self.caption_norm = RMSNorm(dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.transformer_blocks = block_list(
            [set_attention(SanaTransformerBlock(dim, cfg, **kw), attention) for _ in range(cfg["num_layers"])],
            scan_layers,
        )
        self.scale_shift_table = scale_shift_table(2, dim, rngs, param_dtype)
        self.norm_out = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.proj_out = linear(dim, self.patch_size**2 * self.out_channels, axes=(EMBED, None), **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        guidance: jax.Array | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        hidden_states = jnp.asarray(hidden_states)
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be [B, C, H, W], got shape {hidden_states.shape}")
        if self.config["guidance_embeds"] and guidance is None:
            raise ValueError("this Sana model has guidance_embeds=True: pass guidance [B] (the guidance scale)")
        if not self.config["guidance_embeds"] and guidance is not None:
            raise ValueError("this Sana model has guidance_embeds=False: guidance must be None")
        b, _, height, width = hidden_states.shape
        p = self.patch_size
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        mask = cross_attention_mask(encoder_attention_mask, b)

        x = self.patch_embed(hidden_states)
        if guidance is not None:
            modulation, embedded_timestep = self.time_embed(timestep, jnp.broadcast_to(jnp.asarray(guidance), (b,)))
        else:
            modulation, embedded_timestep = self.time_embed(timestep)
        context = self.caption_norm(self.caption_projection(encoder_hidden_states))

        grid = dict(height=height // p, width=width // p)
        x = run_blocks(self.transformer_blocks, lambda block, x, *a: block(x, *a, **grid), x, context, mask,
                       modulation, remat=self.remat)

        table = self.scale_shift_table[...][None].astype(embedded_timestep.dtype)
        shift, scale = jnp.split(table + embedded_timestep[:, None], 2, axis=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)
        return unpatchify(x, height, width, p, self.out_channels)


_SANA_COMMON = {
    "in_channels": 32,
    "out_channels": 32,
    "attention_head_dim": 32,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,
}

# Published Sana transformer configs (Efficient-Large-Model/Sana_{600M,1600M}_1024px_diffusers).
SANA_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "Sana-600M": (
        "SanaTransformer2DModel",
        {**_SANA_COMMON, "num_attention_heads": 36, "num_layers": 28, "num_cross_attention_heads": 16,
         "cross_attention_head_dim": 72, "cross_attention_dim": 1152},
    ),
    "Sana-1.6B": (
        "SanaTransformer2DModel",
        {**_SANA_COMMON, "num_attention_heads": 70, "num_layers": 20, "num_cross_attention_heads": 20,
         "cross_attention_head_dim": 112, "cross_attention_dim": 2240},
    ),
}
