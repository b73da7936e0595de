"""FLUX.1 as diffusers' ``FluxTransformer2DModel``, in Flax NNX.

Packed latent tokens and T5 tokens are embedded, then run through double-stream blocks (separate
weights per stream, one joint attention) and single-stream blocks (one concatenated stream,
attention and MLP in parallel). Positions enter only through 3-axis rotary embeddings computed
from ``txt_ids`` and ``img_ids``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
)
from fraqat_jax.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    timestep_embedding,
)
from fraqat_jax.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    modulate,
)
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

# The published FLUX.1 transformer (black-forest-labs/FLUX.1-{schnell,dev}); the presets below add
# guidance_embeds.
FLUX_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}


def rope_frequencies(ids: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0):
    """3-axis rotary tables (diffusers ``FluxPosEmbed``): axis ``i`` of ``ids`` rotates
    ``axes_dim[i]`` channels at frequencies ``theta ** (-2j / axes_dim[i])``.

    ``ids [S, n_axes]`` (positions, may be fractional) -> ``(cos, sin)`` each ``[S, sum(axes_dim)]``
    float32, every frequency repeated twice (interleaved pairs).
    """
    ids = jnp.asarray(ids, jnp.float32)
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids must be [tokens, {len(axes_dim)}] (one column per RoPE axis), got {ids.shape}")
    cos, sin = [], []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = ids[:, axis : axis + 1] * jnp.asarray(freqs, jnp.float32)[None]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=1))
    return jnp.concatenate(cos, axis=1), jnp.concatenate(sin, axis=1)


class CombinedTimestepGuidanceTextProjEmbeddings(nnx.Module):
    """FLUX.1-dev conditioning (diffusers ``CombinedTimestepGuidanceTextProjEmbeddings``):
    ``timestep_embedder(t) + guidance_embedder(g) + text_embedder(pooled)``.

    Call ``(timestep [B], guidance [B], pooled_projection [B, P])`` -> ``[B, dim]``.
    """

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, *, rngs: nnx.Rngs, dtype: Any = None,
                 param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.guidance_embedder = TimestepEmbedding(256, embedding_dim, **kw)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu", **kw)

    def __call__(self, timestep: jax.Array, guidance: jax.Array, pooled_projection: jax.Array) -> jax.Array:
        compute = self.dtype or pooled_projection.dtype

        def features(values):
            return timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0).astype(compute)

        emb = self.timestep_embedder(features(timestep)) + self.guidance_embedder(features(guidance))
        return emb + self.text_embedder(pooled_projection)


class FluxTransformerBlock(nnx.Module):
    """Double-stream block (diffusers ``FluxTransformerBlock``): each stream has its own adaLN-Zero
    (``norm1``/``norm1_context``), MLP (``ff``/``ff_context``) and projections; one joint
    attention over ``[context, image]`` with qk RMSNorm and RoPE.

    Call ``(x [B, N, D], context [B, L, D], temb [B, D], cos, sin [L+N, Dh])`` -> ``(context, x)``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AdaLayerNormZero(dim, zero_init=False, **kw)
        self.norm1_context = AdaLayerNormZero(dim, zero_init=False, **kw)
        self.attn = Attention(
            dim, heads=heads, dim_head=head_dim, added_kv_proj_dim=dim, out_dim=dim, context_pre_only=False,
            bias=True, qk_norm="rms_norm", eps=1e-6, context_first=True, **kw,
        )
        self.norm2 = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.ff = FeedForward(dim, dim, activation_fn="gelu-approximate", **kw)
        self.norm2_context = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.ff_context = FeedForward(dim, dim, activation_fn="gelu-approximate", **kw)

    def __call__(self, x, context, temb, cos, sin):
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, emb=temb)
        attn_out, context_attn_out = self.attn(norm_x, norm_c, None, (cos, sin))
        x = x + gate_msa[:, None] * attn_out
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * context_attn_out
        context = context + c_gate_mlp[:, None] * self.ff_context(
            modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp)
        )
        return context, x


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block (diffusers ``FluxSingleTransformerBlock``): one adaLN-Zero ``norm``,
    attention (no output projection of its own) and ``proj_mlp`` + GELU-tanh side by side,
    concatenated and mixed by ``proj_out``, gated residual.

    Call ``(stream [B, L+N, D], temb [B, D], cos, sin)`` -> ``[B, L+N, D]``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, *, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        mlp_hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim, zero_init=False, **kw)
        self.proj_mlp = linear(dim, mlp_hidden, axes=(EMBED, MLP), **kw)
        self.proj_out = linear(dim + mlp_hidden, dim, axes=(MLP, EMBED), **kw)
        self.attn = Attention(
            dim, heads=heads, dim_head=head_dim, out_dim=dim, bias=True, qk_norm="rms_norm", eps=1e-6,
            pre_only=True, **kw,
        )

    def __call__(self, stream, temb, cos, sin):
        normed, gate = self.norm(stream, temb)
        mlp = jax.nn.gelu(self.proj_mlp(normed), approximate=True)
        attn = self.attn(normed, None, None, (cos, sin))
        return stream + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))


class FluxTransformer2DModel(nnx.Module):
    """Port of diffusers ``FluxTransformer2DModel`` (FLUX.1-schnell; FLUX.1-dev with
    ``guidance_embeds=True``).

    ``config``: diffusers keys (``FLUX_DEFAULTS``), kept as a plain dict on ``self.config``.
    Random init follows diffusers (torch defaults, no zero-init).

    Call ``(hidden_states [B, N, in_channels] packed latent tokens, encoder_hidden_states
    [B, L, joint_attention_dim], pooled_projections [B, pooled_projection_dim], timestep [B] in
    [0, 1], img_ids [N, 3], txt_ids [L, 3], guidance [B] | None)`` -> ``[B, N, p*p*out_channels]``.
    Ids with a leading batch axis (deprecated in diffusers) use their first row. ``timestep`` and
    ``guidance`` are scaled by 1000 inside, as in diffusers.

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
        cfg = merge_config(FLUX_DEFAULTS, config, "FluxTransformer2DModel")
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        if sum(cfg["axes_dims_rope"]) != head_dim:
            raise ValueError(
                f"axes_dims_rope {cfg['axes_dims_rope']} must sum to attention_head_dim={head_dim}"
            )
        self.config = cfg
        self.remat = check_remat(remat)
        self.scan_layers = scan_layers
        self.dtype = dtype
        rngs = KeySequence(rngs)  # cheap under nnx.eval_shape (see layers.KeySequence)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = heads * head_dim
        self.inner_dim = dim
        self.out_channels = cfg["out_channels"] or cfg["in_channels"]

        self.time_text_embed = (
            CombinedTimestepGuidanceTextProjEmbeddings(dim, cfg["pooled_projection_dim"], **kw)
            if cfg["guidance_embeds"]
            else CombinedTimestepTextProjEmbeddings(dim, cfg["pooled_projection_dim"], **kw)
        )
        self.context_embedder = linear(cfg["joint_attention_dim"], dim, axes=(None, EMBED), **kw)
        self.x_embedder = linear(cfg["in_channels"], dim, axes=(None, EMBED), **kw)
        self.transformer_blocks = block_list(
            [set_attention(FluxTransformerBlock(dim, heads, head_dim, **kw), attention)
             for _ in range(cfg["num_layers"])], scan_layers
        )
        self.single_transformer_blocks = block_list(
            [set_attention(FluxSingleTransformerBlock(dim, heads, head_dim, **kw), attention)
             for _ in range(cfg["num_single_layers"])], scan_layers
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, zero_init=False, **kw)
        self.proj_out = linear(dim, cfg["patch_size"] ** 2 * self.out_channels, axes=(EMBED, None), **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        hidden_states = jnp.asarray(hidden_states)
        if hidden_states.ndim != 3:
            raise ValueError(f"hidden_states must be packed tokens [B, N, C], got shape {hidden_states.shape}")
        if self.config["guidance_embeds"] and guidance is None:
            raise ValueError("this Flux model has guidance_embeds=True (FLUX.1-dev): pass guidance [B]")
        if not self.config["guidance_embeds"] and guidance is not None:
            raise ValueError("this Flux model has guidance_embeds=False (FLUX.1-schnell): guidance must be None")
        b, n, _ = hidden_states.shape
        img_ids, txt_ids = jnp.asarray(img_ids), jnp.asarray(txt_ids)
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        if img_ids.shape[0] != n or txt_ids.shape[0] != encoder_hidden_states.shape[1]:
            raise ValueError(
                f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must have one row per image token ({n}) "
                f"/ text token ({encoder_hidden_states.shape[1]})"
            )

        x = self.x_embedder(hidden_states)
        compute = x.dtype
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,)).astype(compute) * 1000
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance), (b,)).astype(compute) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        cos, sin = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0), self.config["axes_dims_rope"])

        # carry (x, context); the double block returns (context, x)
        x, context = run_blocks(self.transformer_blocks, lambda block, c, *a: block(c[0], c[1], *a)[::-1],
                                (x, context), temb, cos, sin, remat=self.remat)
        text_len = context.shape[1]
        stream = jnp.concatenate([context, x], axis=1)
        stream = run_blocks(self.single_transformer_blocks, lambda block, s, *a: block(s, *a), stream, temb, cos,
                            sin, remat=self.remat)
        x = stream[:, text_len:]
        return self.proj_out(self.norm_out(x, temb))


# Published FLUX.1 transformer configs (black-forest-labs/FLUX.1-{schnell,dev}).
FLUX_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "FLUX.1-schnell": ("FluxTransformer2DModel", {**FLUX_DEFAULTS, "guidance_embeds": False}),
    "FLUX.1-dev": ("FluxTransformer2DModel", {**FLUX_DEFAULTS, "guidance_embeds": True}),
}
