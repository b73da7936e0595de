"""Stable Diffusion 3 / 3.5 MMDiT as diffusers' ``SD3Transformer2DModel``, in Flax NNX.

Two token streams (image patches and text context) with separate weights meet in one joint
attention per block. SD3.5 adds per-head RMS qk-norm (``qk_norm="rms_norm"``) and, in the blocks
listed in ``dual_attention_layers``, a second image-only attention (``attn2``) modulated by
``SD35AdaLayerNormZeroX``. The last block is ``context_pre_only``: the context stream only feeds
the attention and is not updated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.activations import FeedForward
from fraqat_jax.models.attention import Attention, set_attention
from fraqat_jax.models.common import EMBED, KeySequence, LayerNorm, linear, merge_config
from fraqat_jax.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    PatchEmbed,
    unpatchify,
)
from fraqat_jax.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    SD35AdaLayerNormZeroX,
    modulate,
)
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

SD3_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock``.

    Call ``(hidden_states [B, N, D], encoder_hidden_states [B, L, D], temb [B, D])`` ->
    ``(encoder_hidden_states [B, L, D] or None if context_pre_only, hidden_states [B, N, D])``
    (diffusers' return order).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        use_dual_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim, **kw) if use_dual_attention else AdaLayerNormZero(dim, **kw)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(
                dim, dim, elementwise_affine=False, eps=1e-6, bias=True, norm_type="layer_norm", **kw
            )
        else:
            self.norm1_context = AdaLayerNormZero(dim, **kw)
        attn_kw = dict(heads=num_attention_heads, dim_head=attention_head_dim, out_dim=dim, bias=True,
                       qk_norm=qk_norm, eps=1e-6, **kw)
        self.attn = Attention(dim, added_kv_proj_dim=dim, context_pre_only=context_pre_only, **attn_kw)
        self.attn2 = Attention(dim, **attn_kw) if use_dual_attention else None
        self.norm2 = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.ff = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate", **kw)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
            self.ff_context = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate", **kw)

    def __call__(self, hidden_states, encoder_hidden_states, temb):
        if self.use_dual_attention:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = self.norm1(hidden_states, temb)
        else:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb
            )

        attn_out, context_attn_out = self.attn(norm_x, norm_c)
        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            hidden_states = hidden_states + gate_msa2[:, None] * self.attn2(norm_x2)
        norm_x = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_x)

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        norm_c = modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(norm_c)
        return encoder_hidden_states, hidden_states


class SD3Transformer2DModel(nnx.Module):
    """Port of diffusers ``SD3Transformer2DModel`` (SD3 and SD3.5).

    ``config``: diffusers keys (see ``SD3_DEFAULTS``; missing ones take diffusers' defaults),
    stored as a plain dict on ``self.config``. Random init is torch's default with adaLN-Zero
    (modulation linears and ``proj_out`` start at zero). ``pos_embed.pos_embed`` is a ``Buffer``
    of shape ``[1, M*M, D]`` (``M = pos_embed_max_size``), centre-cropped to the input.

    Call ``(hidden_states [B, C, H, W], encoder_hidden_states [B, L, joint_attention_dim],
    pooled_projections [B, pooled_projection_dim], timestep [B], skip_layers=None)`` ->
    ``[B, out_channels, H, W]``. ``H`` and ``W`` need not be equal (at most ``M * patch_size``).
    ``skip_layers``: block indices to skip (skip-layer guidance).

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
        cfg = merge_config(SD3_DEFAULTS, config, "SD3Transformer2DModel")
        if cfg["qk_norm"] not in (None, "rms_norm", "layer_norm"):
            raise ValueError(f"Unsupported qk_norm {cfg['qk_norm']!r}; supported: None, 'rms_norm', 'layer_norm'")
        self.config = cfg
        self.remat = check_remat(remat)
        self.scan_layers = scan_layers
        kw = dict(rngs=KeySequence(rngs), dtype=dtype, param_dtype=param_dtype)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg["caption_projection_dim"] != dim:
            raise ValueError(
                f"caption_projection_dim ({cfg['caption_projection_dim']}) must equal "
                f"num_attention_heads * attention_head_dim ({dim})"
            )
        self.inner_dim = dim
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg["out_channels"] if cfg["out_channels"] is not None else cfg["in_channels"]
        num_layers = cfg["num_layers"]
        dual = set(cfg["dual_attention_layers"])

        self.pos_embed = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=dim,
            pos_embed_max_size=cfg["pos_embed_max_size"],
            **kw,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg["pooled_projection_dim"], **kw)
        self.context_embedder = linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"],
                                       axes=(None, EMBED), **kw)
        self.transformer_blocks = block_list(
            [
                set_attention(JointTransformerBlock(
                    dim,
                    cfg["num_attention_heads"],
                    cfg["attention_head_dim"],
                    context_pre_only=i == num_layers - 1,
                    qk_norm=cfg["qk_norm"],
                    use_dual_attention=i in dual,
                    **kw,
                ), attention)
                for i in range(num_layers)
            ],
            scan_layers,
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, **kw)
        self.proj_out = linear(dim, self.patch_size**2 * self.out_channels, axes=(EMBED, None), zero=True, **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        skip_layers: Sequence[int] | None = None,
    ) -> jax.Array:
        hidden_states = jnp.asarray(hidden_states)
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be [B, C, H, W], got shape {hidden_states.shape}")
        b, _, height, width = hidden_states.shape
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))

        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        # carry (x, context); the block returns (context, x), context None after the last block
        x, context = run_blocks(self.transformer_blocks, lambda block, c, t: block(c[0], c[1], t)[::-1],
                                (x, context), temb, remat=self.remat, skip=tuple(skip_layers or ()))
        x = self.norm_out(x, temb)
        x = self.proj_out(x)
        return unpatchify(x, height, width, self.patch_size, self.out_channels)


# Published SD3 / SD3.5 transformers (stabilityai).
_SD3_COMMON = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
}

SD3_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "SD3-Medium": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 24, "num_attention_heads": 24,
         "caption_projection_dim": 1536, "pos_embed_max_size": 192},
    ),
    "SD3.5-Medium": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 24, "num_attention_heads": 24,
         "caption_projection_dim": 1536, "pos_embed_max_size": 384,
         "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
    ),
    "SD3.5-Large": (
        "SD3Transformer2DModel",
        {**_SD3_COMMON, "sample_size": 128, "num_layers": 38, "num_attention_heads": 38,
         "caption_projection_dim": 2432, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    ),
}
