"""Adaptive layer norms (adaLN), named like diffusers' ``normalization.py``: a LayerNorm without
affine parameters whose shift/scale/gate come from a conditioning embedding. The plain
``LayerNorm``/``RMSNorm`` live in ``models.common`` beside ``linear`` (they stand in for torch's own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.common import EMBED, MLP, Dtype, LayerNorm, RMSNorm, linear
from fraqat_jax.models.embeddings import CombinedTimestepLabelEmbeddings

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
