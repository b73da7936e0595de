"""Gemma-2's self-attention (``models.gemma2``): grouped-query heads, soft-capped scores, causal or
sliding-window masks and key padding, as XLA ops or as JAX's Pallas *splash* kernel on TPU.

Layout ``[B, L, H, D]`` (tokens before heads). Scores are scaled by ``query_pre_attn_scalar **
-0.5`` (``scale``, applied to the float32 scores; the splash kernel takes ``q`` pre-scaled); a
score ``s`` becomes ``cap * tanh(s / cap)`` when a cap is set. A sliding window of ``w`` lets query
``t`` see keys ``t - w < s <= t`` (itself included), as transformers' masks do.

- :func:`xla_attention`: transformers' eager attention (float32 scores and softmax; a row whose
  keys are all masked becomes uniform over every key, as transformers' additive mask makes it).
- :func:`splash_attention`: the TPU kernel (``jax.experimental.pallas.ops.tpu.splash_attention``),
  which takes the local window, the soft cap and grouped heads itself; padding travels as segment
  ids, so a padded query row differs from the XLA one (it sees the padding keys): ignore those rows.
- :func:`masked_attention`: the XLA form under an explicit ``[B, T, S]`` mask (the key-value cache
  of ``models.gemma2`` masks by the stored positions of its slots).
- :func:`gemma2_attention`: picks one (``attention=`` of the port) when the program is lowered.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fraqat_jax.models.attention import check_attention, dividing_axes

__all__ = ["NO_WINDOW", "gemma2_attention", "masked_attention", "splash_attention", "xla_attention"]

#: Window size of a full-attention layer: larger than any sequence.
NO_WINDOW = 2**30
_TPU_BLOCK = 128  # the splash kernel's default tile along both token axes and the lane width


def xla_attention(q, k, v, key_valid, window, softcap, scale: float = 1.0):
    """Eager Gemma-2 attention. ``q [B, T, Hq, D]``, ``k``, ``v`` ``[B, S, Hkv, D]``, ``key_valid
    [B, S]`` bool or None, ``window`` int (traced or not) -> ``[B, T, Hq, D]``. ``scale`` multiplies
    the float32 scores (a Python float, never rounded to ``q``'s dtype, as transformers multiplies
    its scores by the float ``scaling``); pass 1.0 for a ``q`` that comes scaled."""
    t, s = q.shape[1], k.shape[1]
    offset = jnp.arange(t)[:, None] - jnp.arange(s)[None, :]  # query index - key index
    allowed = ((offset >= 0) & (offset < window))[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return masked_attention(q, k, v, allowed, softcap, scale)


def masked_attention(q, k, v, allowed, softcap, scale: float = 1.0):
    """Grouped-query attention with an explicit mask: ``q [B, T, Hq, D]``, ``k``, ``v`` ``[B, S, Hkv,
    D]``, ``allowed [B or 1, T, S]`` bool -> ``[B, T, Hq, D]``. Scores in float32, times ``scale``,
    soft-capped, masked, softmax in float32 cast to ``v``'s dtype (transformers' eager attention)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * jnp.float32(scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    # transformers adds the dtype's minimum: a row with no allowed key becomes uniform, as here
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


def splash_attention(q, k, v, key_valid, *, window: int | None, softcap, interpret: bool = False):
    """The Pallas splash kernel on ``[B, T, H, D]`` inputs (``q`` already scaled): causal, or local
    with ``window`` keys (itself included); padding as segment ids (0 = padding, 1 = token), the
    token axes padded to the tile, the head size padded to a multiple of 128 with zeros (which
    changes no score). Under a mesh it runs in ``jax.shard_map``, batch over ``data``/``fsdp`` and
    key-value heads over ``tensor``. ``interpret=True`` runs the kernel's Python interpreter (CPU
    tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    t_pad, d_pad = -t % _TPU_BLOCK, -d % _TPU_BLOCK
    if key_valid is None:
        key_valid = jnp.ones((b, t), bool)

    def local(q, k, v, key_valid):
        heads = q.shape[2]
        n = t + t_pad
        shape = (n, n)
        base = (masks.CausalMask(shape) if window is None
                else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0))
        kernel = splash.make_splash_mha(masks.MultiHeadMask([base] * heads), head_shards=1, q_seq_shards=1,
                                        attn_logits_soft_cap=softcap, interpret=interpret)
        to_bhld = lambda x: jnp.pad(x, ((0, 0), (0, t_pad), (0, 0), (0, d_pad))).transpose(0, 2, 1, 3)
        segments = jnp.pad(key_valid, ((0, 0), (0, t_pad))).astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
            to_bhld(q), to_bhld(k), to_bhld(v), segments)
        return out.transpose(0, 2, 1, 3)[:, :t, :, :d]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, key_valid)
    batch_axes = dividing_axes(mesh, ("data", "fsdp"), b)
    head_axes = dividing_axes(mesh, ("tensor",), hkv)
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, head_axes or None, None)
    mask_spec = jax.sharding.PartitionSpec(batch_axes or None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, mask_spec), out_specs=spec,
                         check_vma=False)(q, k, v, key_valid)


def gemma2_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, window: Any, *,
    softcap: float | None, sliding_window: int | None, kinds: tuple[str, ...], implementation: str = "xla",
    scale: float = 1.0,
) -> jax.Array:
    """Gemma-2 self-attention on ``q [B, L, Hq, D]``, ``k``, ``v`` ``[B, L, Hkv, D]`` -> ``[B, L, Hq,
    D]``, scores scaled by ``scale`` (``query_pre_attn_scalar ** -0.5``; the XLA path scales the
    float32 scores, the TPU kernel takes ``q`` scaled in float32 and rounded once).

    ``key_valid [B, L]`` bool (None: no padding); ``window``: the number of keys each query sees
    counting itself (an int32 scalar, possibly traced; ``2**30`` on a full-attention layer);
    ``sliding_window``: the config's window; ``kinds``: the layer kinds the model holds (with
    both, the TPU kernel picks its mask with ``jax.lax.cond`` on ``window``; with one, the mask is
    static); ``implementation``: see the module docstring."""
    check_attention(implementation)
    xla = lambda q, k, v, m, w: xla_attention(q, k, v, m, w, softcap, scale)
    if implementation == "xla":
        return xla(q, k, v, key_valid, window)
    scaled = lambda q: (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    if jax.default_backend() == "gpu" and implementation == "flash":
        raise ValueError("attention='flash' has no GPU kernel for Gemma-2 (soft-capped scores): use 'auto' or 'xla'")

    def tpu(q, k, v, m, w):
        q = scaled(q)
        causal = functools.partial(splash_attention, window=None, softcap=softcap)
        if sliding_window is None or "sliding_attention" not in kinds:
            return causal(q, k, v, m)
        sliding = functools.partial(splash_attention, window=int(sliding_window), softcap=softcap)
        if "full_attention" not in kinds:
            return sliding(q, k, v, m)
        return jax.lax.cond(w < NO_WINDOW, sliding, causal, q, k, v, m)

    return jax.lax.platform_dependent(q, k, v, key_valid, window, default=xla, tpu=tpu)
