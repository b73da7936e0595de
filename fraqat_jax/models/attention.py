"""Multi-head attention mirroring diffusers ``Attention`` (self, cross and SD3/Flux joint).

Parameter names follow diffusers: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``to_out.1`` is the
dropout slot), ``norm_q``/``norm_k`` (per-head qk-norm), and for joint attention
``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``, ``norm_added_q``/``norm_added_k``.

Layout: tokens ``[B, N, D]``; heads are split to ``[B, N, H, Dh]`` (the BTNH layout of
``jax.nn.dot_product_attention``).

Every port's attention goes through :func:`dot_product_attention`, one dispatch for plain scores
(diffusers) and soft-capped, sliding-window, grouped-query scores (Gemma-2), which are its arguments.
Implementations (``attention=`` on every port, :func:`set_attention`):
- ``"xla"``: XLA ops that materialise the ``[B, H, T, S]`` scores (float32 softmax):
  ``jax.nn.dot_product_attention`` for plain scores, :func:`eager_attention` (transformers' eager
  form) for the others; what the parity tests check.
- ``"auto"``: a fused kernel that never holds the score matrix where one exists and suits the
  call, else ``"xla"``: on TPU the Pallas *flash* kernel
  (``jax.experimental.pallas.ops.tpu.flash_attention``) for plain scores and the *splash* kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``, which takes the window, the soft cap and
  grouped heads itself) for a causal window; on GPU cuDNN
  (``jax.nn.dot_product_attention(implementation="cudnn")``, plain scores, bf16/fp16 and no mask);
  on CPU XLA. The TPU branch is chosen when the program is *lowered* (``jax.lax.platform_dependent``),
  so a program compiled ahead of time for a TPU topology on a CPU host gets the kernel.
- ``"flash"``: like ``"auto"`` but a call no GPU kernel takes (float32, a mask, a soft cap or a
  window) raises instead of falling back; on CPU there is no kernel and XLA runs.
The TPU kernels pad the token axes to a multiple of 128 and mask the padding (and a key mask
``[B, 1, 1, S]``: PixArt's and Sana's captions, Gemma-2's padding) with segment ids; other mask
shapes use XLA. Under a mesh (``jax.set_mesh``) they run in ``jax.shard_map`` with the batch split
over ``parallel.mesh.BATCH_AXES`` and the key-value heads over ``parallel.mesh.HEAD_AXES`` (other
axes replicate); a multi-device program traced without a mesh context cannot partition a kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.common import (
    EMBED,
    HEADS,
    Dtype,
    Identity,
    LayerNorm,
    RMSNorm,
    linear,
)
from fraqat_jax.parallel.mesh import BATCH_AXES, HEAD_AXES, dividing_axes


def apply_rotary_emb(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary position embedding on interleaved pairs (diffusers ``apply_rotary_emb`` with
    ``use_real=True, use_real_unbind_dim=-1``, as Flux uses it).

    ``x [B, S, H, Dh]``, ``cos``/``sin`` ``[S, Dh]`` (each frequency repeated twice) -> ``x``'s shape,
    computed in float32.
    """
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "flash")
NO_WINDOW = 2**30  # a causal window larger than any sequence: every earlier key (full causal attention)
_TPU_BLOCK = 128  # the Pallas TPU kernels' default tile along both token axes (and the lane width)


def check_attention(implementation: str) -> str:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not allowed: use one of {ATTENTION_IMPLEMENTATIONS}")
    return implementation


def set_attention(module: nnx.Module, implementation: str) -> nnx.Module:
    """Sets the attention implementation of every :class:`Attention` in ``module`` (in place)."""
    check_attention(implementation)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Attention):
            node.implementation = implementation
    return module


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, implementation: str = "xla", *,
    scale: float | None = None, softcap: float | None = None, window: Any = None,
    windows: tuple[int, ...] | None = None,
) -> jax.Array:
    """Softmax attention, the one dispatch of every port. ``q [B, T, Hq, D]``, ``k, v [B, S, Hkv, D]``
    with ``Hq`` a multiple of ``Hkv`` (grouped queries: ``Hq / Hkv`` query heads share a key-value
    head) -> ``[B, T, Hq, D]``.

    - ``scale``: a score is ``q . k * scale`` (default ``D**-0.5``);
    - ``softcap``: a score ``s`` becomes ``softcap * tanh(s / softcap)``;
    - ``window``: None lets every query see every key; an int (traced or not) makes attention causal
      with a sliding window: query ``t`` sees keys ``t - window < s <= t`` (:data:`NO_WINDOW`: all
      earlier keys). ``windows``: the values a traced ``window`` can take (static; default
      ``(window,)``), one TPU kernel mask each;
    - ``mask``: boolean (True = attend) broadcastable to ``[B, Hq, T, S]``.

    ``implementation``: see the module docstring. ``"xla"`` computes ``jax.nn.dot_product_attention``
    for plain scores (no soft cap, no window, one key-value head per query head) and
    :func:`eager_attention` otherwise. The fused kernels: on TPU Pallas *flash* for plain scores
    and *splash* for a causal window (both when ``mask`` is None or masks keys only, ``[B or 1, 1, 1,
    S]``), on GPU cuDNN for plain scores (bf16/fp16 without a mask under ``"auto"``)."""
    check_attention(implementation)
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    plain = window is None and softcap is None
    if plain and hq == hkv:
        xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)  # noqa: E731
    else:
        xla = functools.partial(eager_attention, mask=mask, scale=scale, softcap=softcap, window=window)
    if implementation == "xla":
        return xla(q, k, v)
    branches = {}
    # The cuDNN branch cannot even be traced without a GPU, so it is offered only on one.
    if jax.default_backend() == "gpu" and plain:
        suits_cudnn = mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
        if implementation == "flash" or suits_cudnn:
            branches["cuda"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                                            implementation="cudnn")
    elif jax.default_backend() == "gpu" and implementation == "flash":
        raise ValueError("attention='flash' has no GPU kernel for soft-capped or causal-window scores: "
                         "use 'auto' or 'xla'")
    key_valid = _key_padding_mask(mask, b, s)
    if mask is None or key_valid is not None:
        if plain and hq == hkv:
            branches["tpu"] = functools.partial(_tpu_flash, key_valid=key_valid, scale=scale)
        elif window is not None and t == s:
            branches["tpu"] = functools.partial(_tpu_splash, key_valid=key_valid, scale=scale, softcap=softcap,
                                                window=window, windows=windows)
    return jax.lax.platform_dependent(q, k, v, default=xla, **branches)


def eager_attention(q, k, v, *, mask=None, scale=None, softcap=None, window=None) -> jax.Array:
    """:func:`dot_product_attention` as XLA ops in transformers' eager form: float32 scores times
    ``scale`` (a Python float, never rounded to ``q``'s dtype: transformers multiplies its scores by
    the float), float32 softmax, grouped heads as a reshape; a row whose keys are all masked becomes
    uniform over every key, as transformers' additive mask makes it."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    allowed = jnp.ones((1, 1, 1, t, s), bool)
    if window is not None:
        offset = jnp.arange(t)[:, None] - jnp.arange(s)[None, :]  # query index - key index
        allowed = ((offset >= 0) & (offset < window))[None, None, None]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, T|1, S|1]
        if mask.shape[1] == 1:
            allowed = allowed & mask[:, :, None]
        else:
            allowed = allowed & mask.reshape(mask.shape[0], hkv, hq // hkv, *mask.shape[2:])
    # transformers adds the dtype's minimum: a row with no allowed key becomes uniform, as here
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


def _key_padding_mask(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array | None:
    """``mask`` as ``[B, S]`` when it masks keys only (shape ``[B or 1, 1, 1, S]``), else None."""
    if mask is None or mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != kv_len:
        return None
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))


def _on_mesh(local, q, k, v, key_valid):
    """``local(q, k, v, key_valid)`` in a ``shard_map`` when a mesh is set (Mosaic kernels are not
    partitioned automatically): the batch over :data:`parallel.mesh.BATCH_AXES`, the key-value
    heads (and their query heads) over :data:`parallel.mesh.HEAD_AXES`, where the sizes divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, key_valid)
    batch_axes = dividing_axes(mesh, BATCH_AXES, q.shape[0])
    head_axes = dividing_axes(mesh, HEAD_AXES, k.shape[2])
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, head_axes or None, None)
    mask_spec = jax.sharding.PartitionSpec(batch_axes or None, None)
    in_specs = (spec, spec, spec, None if key_valid is None else mask_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(q, k, v, key_valid)


def _tpu_flash(q, k, v, *, key_valid, scale):
    """The Pallas TPU flash kernel on BTNH inputs, token axes padded to the tile (the padding keys
    masked with segment ids, as are the keys ``key_valid [B, S]`` marks False)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import (
        SegmentIds,
        flash_attention,
    )

    b, t, h, d = q.shape
    s = k.shape[1]
    t_pad, s_pad = -t % _TPU_BLOCK, -s % _TPU_BLOCK
    if key_valid is None and s_pad:
        key_valid = jnp.ones((b, s), bool)

    def local(q, k, v, key_valid):
        to_bhsd = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
        segments = None
        if key_valid is not None:
            kv_ids = jnp.pad(key_valid, ((0, 0), (0, s_pad))).astype(jnp.int32)
            segments = SegmentIds(q=jnp.ones((q.shape[0], t + t_pad), jnp.int32), kv=kv_ids)
        out = flash_attention(to_bhsd(q, t_pad), to_bhsd(k, s_pad), to_bhsd(v, s_pad), segment_ids=segments,
                              sm_scale=d**-0.5 if scale is None else scale)
        return out.transpose(0, 2, 1, 3)[:, :t]

    return _on_mesh(local, q, k, v, key_valid)


def _tpu_splash(q, k, v, *, key_valid, scale, softcap, window, windows):
    """The splash kernel for a causal ``window``: one static mask per value in ``windows`` (a traced
    window picks its kernel with ``jax.lax.switch``)."""
    q = (q.astype(jnp.float32) * jnp.float32(q.shape[-1] ** -0.5 if scale is None else scale)).astype(q.dtype)
    if windows is None:
        windows = (int(window),)
    kernels = [functools.partial(splash_attention, window=None if w >= NO_WINDOW else int(w), softcap=softcap)
               for w in sorted(windows)]
    if len(kernels) == 1:
        return kernels[0](q, k, v, key_valid)
    index = jnp.searchsorted(jnp.asarray(sorted(windows)), window)
    return jax.lax.switch(index, kernels, q, k, v, key_valid)


def splash_attention(q, k, v, key_valid, *, window: int | None, softcap, interpret: bool = False):
    """The Pallas splash kernel on ``[B, T, H, D]`` self-attention inputs (``q`` already scaled):
    causal, or local with ``window`` keys (itself included); padding as segment ids (0 = padding,
    1 = token), so a padded query row sees the padding keys (unlike :func:`eager_attention`: ignore
    those rows); the token axes padded to the tile, the head size padded to a multiple of 128 with
    zeros (which changes no score); grouped heads taken by the kernel. ``interpret=True`` runs the
    kernel's Python interpreter (CPU tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, _, d = q.shape
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
        to_bhld = lambda x: jnp.pad(x, ((0, 0), (0, t_pad), (0, 0), (0, d_pad))).transpose(0, 2, 1, 3)  # noqa: E731
        segments = jnp.pad(key_valid, ((0, 0), (0, t_pad))).astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
            to_bhld(q), to_bhld(k), to_bhld(v), segments)
        return out.transpose(0, 2, 1, 3)[:, :t, :, :d]

    return _on_mesh(local, q, k, v, key_valid)


def _qk_norm(kind: str | None, dim_head: int, eps: float, elementwise_affine: bool, dtype, param_dtype):
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype, param_dtype=param_dtype)
    if kind == "layer_norm":
        return LayerNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype,
                         param_dtype=param_dtype)
    raise ValueError(f"Unsupported qk_norm {kind!r}; supported: None, 'rms_norm', 'layer_norm'")


class Attention(nnx.Module):
    """diffusers ``Attention`` with the processors used by DiT/PixArt (``AttnProcessor2_0``) and
    SD3/Flux (``JointAttnProcessor2_0`` / ``FluxAttnProcessor``).

    Args (diffusers names): ``query_dim``; ``heads``; ``dim_head``; ``cross_attention_dim``
    (key/value input width, default ``query_dim``); ``added_kv_proj_dim`` (enables joint attention
    with a second stream through ``add_*_proj``); ``bias`` (q/k/v bias); ``out_bias``;
    ``qk_norm`` (None, "rms_norm", "layer_norm": per-head norms, also on the added stream);
    ``eps``; ``out_dim`` (output width and ``heads = out_dim // dim_head`` if given);
    ``context_pre_only`` (joint only: True drops ``to_add_out`` and returns no context output);
    ``pre_only`` (no ``to_out``); ``context_first`` (joint order ``[context, sample]`` as Flux,
    default ``[sample, context]`` as SD3).

    Call ``(hidden_states [B, N, query_dim], encoder_hidden_states [B, L, *] | None,
    attention_mask | None, rotary_emb (cos, sin) each [N_total, Dh] | None)``:
    - plain: returns ``[B, N, out_dim]`` (cross attention if ``encoder_hidden_states`` given);
    - joint (``added_kv_proj_dim`` set and context given): returns ``(sample [B, N, out_dim],
      context [B, L, out_dim] | None)``, context is None with ``context_pre_only``; for
      ``pre_only`` the un-projected sample output is returned.
    ``attention_mask``: boolean, True = attend, broadcastable to ``[B, H, N_q, N_kv]``.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        cross_attention_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        added_proj_bias: bool = True,
        qk_norm: str | None = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        out_dim: int | None = None,
        context_pre_only: bool | None = None,
        pre_only: bool = False,
        context_first: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.implementation = "xla"  # see set_attention
        inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = out_dim // dim_head if out_dim is not None else heads
        self.dim_head = dim_head
        self.context_pre_only = context_pre_only
        self.context_first = context_first
        self.pre_only = pre_only
        kv_in = cross_attention_dim if cross_attention_dim is not None else query_dim
        out_features = out_dim if out_dim is not None else query_dim

        self.norm_q = _qk_norm(qk_norm, dim_head, eps, elementwise_affine, dtype, param_dtype)
        self.norm_k = _qk_norm(qk_norm, dim_head, eps, elementwise_affine, dtype, param_dtype)
        self.to_q = linear(query_dim, inner_dim, use_bias=bias, axes=(EMBED, HEADS), **kw)
        self.to_k = linear(kv_in, inner_dim, use_bias=bias, axes=(EMBED, HEADS), **kw)
        self.to_v = linear(kv_in, inner_dim, use_bias=bias, axes=(EMBED, HEADS), **kw)

        self.joint = added_kv_proj_dim is not None
        if self.joint:
            self.add_k_proj = linear(added_kv_proj_dim, inner_dim, use_bias=added_proj_bias, axes=(EMBED, HEADS), **kw)
            self.add_v_proj = linear(added_kv_proj_dim, inner_dim, use_bias=added_proj_bias, axes=(EMBED, HEADS), **kw)
            self.add_q_proj = (
                linear(added_kv_proj_dim, inner_dim, use_bias=added_proj_bias, axes=(EMBED, HEADS), **kw)
                if context_pre_only is not None
                else None
            )
            # diffusers gives the added-stream RMSNorms an affine scale whatever the flag.
            added_affine = elementwise_affine if qk_norm == "layer_norm" else True
            self.norm_added_q = _qk_norm(qk_norm, dim_head, eps, added_affine, dtype, param_dtype)
            self.norm_added_k = _qk_norm(qk_norm, dim_head, eps, added_affine, dtype, param_dtype)
        else:
            self.add_k_proj = self.add_v_proj = self.add_q_proj = None
            self.norm_added_q = self.norm_added_k = None

        self.to_out = (
            None
            if pre_only
            else nnx.List([linear(inner_dim, out_features, use_bias=out_bias, axes=(HEADS, EMBED), **kw), Identity()])
        )
        self.to_add_out = (
            linear(inner_dim, out_features, use_bias=out_bias, axes=(HEADS, EMBED), **kw)
            if context_pre_only is not None and not context_pre_only
            else None
        )

    def _split(self, x: jax.Array, norm) -> jax.Array:
        b, n, _ = x.shape
        x = x.reshape(b, n, self.heads, self.dim_head)
        return norm(x) if norm is not None else x

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    ):
        b, n, _ = hidden_states.shape
        joint = self.joint and encoder_hidden_states is not None
        q = self._split(self.to_q(hidden_states), self.norm_q)
        kv_src = hidden_states if (joint or encoder_hidden_states is None) else encoder_hidden_states
        k = self._split(self.to_k(kv_src), self.norm_k)
        v = self._split(self.to_v(kv_src), None)

        if joint:
            cq = self._split(self.add_q_proj(encoder_hidden_states), self.norm_added_q)
            ck = self._split(self.add_k_proj(encoder_hidden_states), self.norm_added_k)
            cv = self._split(self.add_v_proj(encoder_hidden_states), None)
            parts = ((cq, q), (ck, k), (cv, v)) if self.context_first else ((q, cq), (k, ck), (v, cv))
            q, k, v = (jnp.concatenate(p, axis=1) for p in parts)

        if rotary_emb is not None:
            cos, sin = rotary_emb
            q = apply_rotary_emb(q, cos, sin)
            k = apply_rotary_emb(k, cos, sin)

        out = dot_product_attention(q, k, v, attention_mask, self.implementation)
        out = out.reshape(b, out.shape[1], self.heads * self.dim_head).astype(q.dtype)

        if not joint:
            return out if self.to_out is None else self.to_out[0](out)
        n_ctx = encoder_hidden_states.shape[1]
        if self.context_first:
            context, sample = out[:, :n_ctx], out[:, n_ctx:]
        else:
            sample, context = out[:, :n], out[:, n:]
        if self.to_out is not None:
            sample = self.to_out[0](sample)
        if self.context_pre_only:
            return sample, None
        if self.to_add_out is not None:
            context = self.to_add_out(context)
        return sample, context
