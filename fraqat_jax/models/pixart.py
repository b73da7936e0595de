"""PixArt-alpha / PixArt-Sigma as diffusers' ``PixArtTransformer2DModel``, in Flax NNX.

Patchify + sin-cos positions, adaLN-single conditioning (one timestep MLP shared by every block,
each block adding its own learned ``scale_shift_table``), self-attention, cross-attention to the
projected T5 caption, GELU-tanh MLP, and a modulated output projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.activations import FeedForward
from fraqat_jax.models.attention import Attention, set_attention
from fraqat_jax.models.common import (
    EMBED,
    MLP,
    KeySequence,
    LayerNorm,
    linear,
    merge_config,
    no_eager_sharding,
)
from fraqat_jax.models.embeddings import (
    PatchEmbed,
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    timestep_embedding,
    unpatchify,
)
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

PIXART_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": None,
    "use_additional_conditions": None,
    "caption_channels": None,
    "attention_type": "default",
}


def scale_shift_table(rows: int, dim: int, rngs: nnx.Rngs, param_dtype: Any) -> nnx.Param:
    """Learned per-block modulation offsets ``[rows, dim]``, initialised ``N(0, 1) / sqrt(dim)``
    as diffusers does."""
    with no_eager_sharding():
        value = jax.random.normal(rngs.params(), (rows, dim), param_dtype) / dim**0.5
        return nnx.Param(value, out_sharding=(None, EMBED))


def cross_attention_mask(encoder_attention_mask: jax.Array | None, batch: int) -> jax.Array | None:
    """diffusers' caption mask ``[B, L]`` (1 = keep, 0 = padding) as a boolean attention mask
    ``[B, 1, 1, L]``. diffusers adds ``-10000`` to padded logits, which in float32 gives them
    exactly zero weight, so a boolean mask is equivalent."""
    if encoder_attention_mask is None:
        return None
    mask = jnp.asarray(encoder_attention_mask)
    if mask.ndim != 2 or mask.shape[0] != batch:
        raise ValueError(
            f"encoder_attention_mask must be [batch={batch}, caption_length] with 1 = keep, 0 = padding; "
            f"got shape {mask.shape}"
        )
    return (mask > 0.5)[:, None, None, :]


class PixArtAlphaCombinedTimestepSizeEmbeddings(nnx.Module):
    """Timestep embedding, plus PixArt-alpha's resolution / aspect-ratio embeddings when
    ``use_additional_conditions`` (diffusers ``PixArtAlphaCombinedTimestepSizeEmbeddings``).

    Call ``(timestep [B], resolution [B, 2] | None, aspect_ratio [B, 1] | None)`` -> ``[B, dim]``.
    """

    def __init__(self, embedding_dim: int, size_emb_dim: int, use_additional_conditions: bool = False, *,
                 rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.use_additional_conditions = use_additional_conditions
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        if use_additional_conditions:
            self.resolution_embedder = TimestepEmbedding(256, size_emb_dim, **kw)
            self.aspect_ratio_embedder = TimestepEmbedding(256, size_emb_dim, **kw)
        else:
            self.resolution_embedder = self.aspect_ratio_embedder = None

    def _features(self, values: jax.Array) -> jax.Array:
        t = timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return t.astype(self.dtype or jnp.float32)

    def __call__(self, timestep, resolution=None, aspect_ratio=None) -> jax.Array:
        emb = self.timestep_embedder(self._features(timestep))
        if not self.use_additional_conditions:
            return emb
        b = emb.shape[0]
        res = self.resolution_embedder(self._features(jnp.asarray(resolution).reshape(-1))).reshape(b, -1)
        ar = self.aspect_ratio_embedder(self._features(jnp.asarray(aspect_ratio).reshape(-1))).reshape(b, -1)
        return emb + jnp.concatenate([res, ar], axis=1)


class AdaLayerNormSingle(nnx.Module):
    """adaLN-single (diffusers ``AdaLayerNormSingle``): ``emb`` embeds the timestep once for the
    whole network and ``linear(silu(emb))`` gives the six modulation vectors every block offsets
    with its own table.

    Call ``(timestep [B], added_cond_kwargs | None)`` -> ``(modulation [B, 6*dim], emb [B, dim])``.
    """

    def __init__(self, embedding_dim: int, use_additional_conditions: bool = False, *, rngs: nnx.Rngs,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(
            embedding_dim, embedding_dim // 3, use_additional_conditions, **kw
        )
        self.linear = linear(embedding_dim, 6 * embedding_dim, axes=(EMBED, MLP), **kw)

    def __call__(self, timestep: jax.Array, added_cond_kwargs: Mapping[str, jax.Array] | None = None):
        cond = added_cond_kwargs or {}
        embedded = self.emb(timestep, cond.get("resolution"), cond.get("aspect_ratio"))
        return self.linear(jax.nn.silu(embedded)), embedded


def ada_single_chunks(table: nnx.Param, modulation: jax.Array, n: int) -> list[jax.Array]:
    """``table [n, D] + modulation [B, n*D]`` split into ``n`` pieces ``[B, 1, D]``."""
    b = modulation.shape[0]
    summed = table[...][None].astype(modulation.dtype) + modulation.reshape(b, n, -1)
    return jnp.split(summed, n, axis=1)


class PixArtBlock(nnx.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"`` (PixArt):
    ``norm1``/``attn1`` self-attention, ``attn2`` cross-attention on the un-normalised stream,
    ``norm2``/``ff`` MLP, all gated by ``scale_shift_table + modulation``.

    Call ``(x [B, N, D], context [B, L, D] | None, mask [B, 1, 1, L] bool | None,
    modulation [B, 6D])`` -> ``[B, N, D]``.
    """

    def __init__(self, dim: int, cfg: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm_kw = dict(eps=cfg["norm_eps"], elementwise_affine=cfg["norm_elementwise_affine"], dtype=dtype,
                       param_dtype=param_dtype)
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        self.norm1 = LayerNorm(dim, **norm_kw)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=cfg["attention_bias"], **kw)
        self.norm2 = LayerNorm(dim, **norm_kw)
        self.attn2 = (
            Attention(dim, heads=heads, dim_head=head_dim, cross_attention_dim=cfg["cross_attention_dim"],
                      bias=cfg["attention_bias"], **kw)
            if cfg["cross_attention_dim"] is not None
            else None
        )
        self.ff = FeedForward(dim, activation_fn=cfg["activation_fn"], **kw)
        self.scale_shift_table = scale_shift_table(6, dim, rngs, param_dtype)

    def __call__(self, x, context, mask, modulation):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_single_chunks(
            self.scale_shift_table, modulation, 6
        )
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        if self.attn2 is not None:
            x = x + self.attn2(x, context, mask)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArtTransformer2DModel(nnx.Module):
    """Port of diffusers ``PixArtTransformer2DModel`` (PixArt-alpha and PixArt-Sigma).

    ``config``: diffusers keys (``PIXART_DEFAULTS``; missing ones take diffusers' defaults), kept
    as a plain dict on ``self.config``. Random init follows diffusers (torch defaults, tables
    ``N(0, 1/dim)``). ``use_additional_conditions=None`` means "only when sample_size == 128",
    as in diffusers; PixArt-Sigma checkpoints set it to False.

    Call ``(hidden_states [B, C, H, W], encoder_hidden_states [B, L, caption_channels],
    timestep [B], added_cond_kwargs=None, encoder_attention_mask [B, L] | None)`` ->
    ``[B, out_channels, H, W]``. ``added_cond_kwargs`` = ``{"resolution": [B, 2],
    "aspect_ratio": [B, 1]}`` is required with additional conditions (PixArt-alpha) and ignored
    otherwise. ``H != W`` is allowed (the sin-cos grid is rebuilt for the input).

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
        cfg = merge_config(PIXART_DEFAULTS, config, "PixArtTransformer2DModel")
        if cfg["norm_type"] != "ada_norm_single":
            raise ValueError(
                f"PixArtTransformer2DModel supports norm_type='ada_norm_single' only, got {cfg['norm_type']!r}"
            )
        if cfg["attention_type"] != "default":
            raise ValueError(f"Unsupported attention_type {cfg['attention_type']!r}; supported: 'default'")
        self.config = cfg
        self.use_additional_conditions = (
            cfg["sample_size"] == 128 if cfg["use_additional_conditions"] is None else cfg["use_additional_conditions"]
        )
        self.remat = check_remat(remat)
        self.scan_layers = scan_layers
        rngs = KeySequence(rngs)  # cheap under nnx.eval_shape (see layers.KeySequence)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.inner_dim = dim
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg["in_channels"] if cfg["out_channels"] is None else cfg["out_channels"]
        interpolation_scale = cfg["interpolation_scale"]
        if interpolation_scale is None:
            interpolation_scale = max(cfg["sample_size"] // 64, 1)

        self.pos_embed = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=dim,
            interpolation_scale=interpolation_scale,
            **kw,
        )
        self.transformer_blocks = block_list(
            [set_attention(PixArtBlock(dim, cfg, **kw), attention) for _ in range(cfg["num_layers"])], scan_layers
        )
        self.norm_out = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.scale_shift_table = scale_shift_table(2, dim, rngs, param_dtype)
        self.proj_out = linear(dim, self.patch_size**2 * self.out_channels, axes=(EMBED, None), **kw)
        self.adaln_single = AdaLayerNormSingle(dim, self.use_additional_conditions, **kw)
        self.caption_projection = (
            PixArtAlphaTextProjection(cfg["caption_channels"], dim, **kw)
            if cfg["caption_channels"] is not None
            else None
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        hidden_states = jnp.asarray(hidden_states)
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be [B, C, H, W], got shape {hidden_states.shape}")
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError(
                "added_cond_kwargs={'resolution': [B, 2], 'aspect_ratio': [B, 1]} is required when "
                "use_additional_conditions=True (PixArt-alpha); got None"
            )
        b, _, height, width = hidden_states.shape
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        mask = cross_attention_mask(encoder_attention_mask, b)

        x = self.pos_embed(hidden_states)
        modulation, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs)
        context = encoder_hidden_states
        if self.caption_projection is not None:
            context = self.caption_projection(context)
        x = run_blocks(self.transformer_blocks, lambda block, x, *a: block(x, *a), x, context, mask, modulation,
                       remat=self.remat)

        table = self.scale_shift_table[...][None].astype(embedded_timestep.dtype)
        shift, scale = jnp.split(table + embedded_timestep[:, None], 2, axis=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)
        return unpatchify(x, height, width, self.patch_size, self.out_channels)


_PIXART_SIGMA_XL_2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "patch_size": 2,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
}

# Published PixArt-Sigma transformer configs (PixArt-alpha/PixArt-Sigma-XL-2-{1024,512}-MS).
PIXART_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "PixArt-Sigma-XL-2-1024": (
        "PixArtTransformer2DModel", {**_PIXART_SIGMA_XL_2, "sample_size": 128, "interpolation_scale": 2}
    ),
    "PixArt-Sigma-XL-2-512": (
        "PixArtTransformer2DModel", {**_PIXART_SIGMA_XL_2, "sample_size": 64, "interpolation_scale": 1}
    ),
}
