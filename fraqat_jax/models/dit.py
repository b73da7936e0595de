"""DiT (Peebles & Xie, 2023) as diffusers' ``DiTTransformer2DModel``, in Flax NNX.

Class-conditional latent transformer: patchify + sin-cos positions, ``num_layers`` adaLN-Zero
blocks (each with its own timestep/label embedder, exactly as diffusers stores them), a final
adaLN modulation computed from block 0's embedder, and unpatchify.
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
)
from fraqat_jax.models.embeddings import PatchEmbed, unpatchify
from fraqat_jax.models.normalization import AdaLayerNormZero
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}


class DiTBlock(nnx.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and self-attention
    only (the DiT configuration): ``norm1`` (adaLN-Zero with its own ``emb``), ``attn1``,
    ``norm3``, ``ff``. Call ``(x [B, N, D], timestep [B], class_labels [B])`` -> ``[B, N, D]``."""

    def __init__(self, dim: int, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AdaLayerNormZero(dim, config["num_embeds_ada_norm"], **kw)
        self.attn1 = Attention(
            dim,
            heads=config["num_attention_heads"],
            dim_head=config["attention_head_dim"],
            bias=config["attention_bias"],
            **kw,
        )
        self.norm3 = LayerNorm(
            dim, eps=config["norm_eps"], elementwise_affine=config["norm_elementwise_affine"],
            dtype=dtype, param_dtype=param_dtype,
        )
        self.ff = FeedForward(dim, activation_fn=config["activation_fn"], **kw)

    def __call__(self, x: jax.Array, timestep: jax.Array, class_labels: jax.Array) -> jax.Array:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels)
        x = x + gate_msa[:, None] * self.attn1(h)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class DiTTransformer2DModel(nnx.Module):
    """Port of diffusers ``DiTTransformer2DModel``.

    ``config``: diffusers keys (see ``DIT_DEFAULTS``; missing ones take diffusers' defaults),
    stored as a plain dict on ``self.config``. ``out_channels = 2 * in_channels`` gives DiT's
    learned-sigma output. Random init is torch's default with adaLN-Zero: every modulation
    linear and the final projection start at zero, so a fresh model outputs zeros.

    Call ``(hidden_states [B, C, H, W], timestep [B], class_labels [B] int)`` ->
    ``[B, out_channels, H, W]``. Labels in ``[0, num_embeds_ada_norm]``; the last value is the
    null class of classifier-free guidance.

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
        cfg = merge_config(DIT_DEFAULTS, config, "DiTTransformer2DModel")
        if cfg["norm_type"] != "ada_norm_zero":
            raise ValueError(f"DiTTransformer2DModel supports norm_type='ada_norm_zero' only, got {cfg['norm_type']!r}")
        if cfg["num_embeds_ada_norm"] is None:
            raise ValueError("DiTTransformer2DModel needs num_embeds_ada_norm (number of classes), got None")
        self.config = cfg
        self.remat = check_remat(remat)
        self.scan_layers = scan_layers
        kw = dict(rngs=KeySequence(rngs), dtype=dtype, param_dtype=param_dtype)
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.inner_dim = dim
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg["in_channels"] if cfg["out_channels"] is None else cfg["out_channels"]

        self.pos_embed = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=dim,
            **kw,
        )
        blocks = [set_attention(DiTBlock(dim, cfg, **kw), attention) for _ in range(cfg["num_layers"])]
        self.transformer_blocks = block_list(blocks, scan_layers)
        self.norm_out = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)
        self.proj_out_1 = linear(dim, 2 * dim, axes=(EMBED, MLP), zero=True, **kw)
        self.proj_out_2 = linear(
            dim, self.patch_size * self.patch_size * self.out_channels, axes=(EMBED, None), zero=True, **kw
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        class_labels: jax.Array,
    ) -> jax.Array:
        hidden_states = jnp.asarray(hidden_states)
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be [B, C, H, W], got shape {hidden_states.shape}")
        if class_labels is None:
            raise ValueError("DiTTransformer2DModel needs class_labels [B]")
        b, _, height, width = hidden_states.shape
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        class_labels = jnp.broadcast_to(jnp.asarray(class_labels), (b,))
        x = self.pos_embed(hidden_states)
        x = run_blocks(self.transformer_blocks, lambda block, x, t, c: block(x, t, c), x, timestep, class_labels,
                       remat=self.remat)
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels)
        shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(conditioning)), 2, axis=-1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)
        return unpatchify(x, height, width, self.patch_size, self.out_channels)


# Published DiT-XL/2 transformers (facebook/DiT-XL-2-256, -512).
_DIT_XL_2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}

DIT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "DiT-XL/2-256": ("DiTTransformer2DModel", {**_DIT_XL_2, "sample_size": 32}),
    "DiT-XL/2-512": ("DiTTransformer2DModel", {**_DIT_XL_2, "sample_size": 64}),
}
