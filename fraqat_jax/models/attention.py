"""Multi-head attention mirroring diffusers ``Attention`` (self, cross and SD3/Flux joint).

Parameter names follow diffusers: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``to_out.1`` is the
dropout slot), ``norm_q``/``norm_k`` (per-head qk-norm), and for joint attention
``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``, ``norm_added_q``/``norm_added_k``.

Layout: tokens ``[B, N, D]``; heads are split to ``[B, N, H, Dh]`` (the BTNH layout of
``jax.nn.dot_product_attention``).

Implementations (``attention=`` on every port, :func:`set_attention`):
- ``"xla"``: ``jax.nn.dot_product_attention`` as XLA ops; materialises the ``[B, H, T, S]``
  scores (float32 softmax), what the diffusers parity tests check.
- ``"auto"``: a fused kernel that never holds the score matrix where one exists and suits the
  call, else ``"xla"``: on TPU the Pallas flash kernel
  (``jax.experimental.pallas.ops.tpu.flash_attention``), on GPU cuDNN
  (``jax.nn.dot_product_attention(implementation="cudnn")``, bf16/fp16 and no mask), on CPU XLA.
  The TPU branch is chosen when the program is *lowered* (``jax.lax.platform_dependent``), so a
  program compiled ahead of time for a TPU topology on a CPU host gets the kernel.
- ``"flash"``: like ``"auto"`` but a call the GPU kernel cannot take (float32, a mask) raises
  instead of falling back; on CPU there is no kernel and XLA runs.
The TPU kernel pads the token axes to a multiple of 128 and masks the padding (and a caption
mask ``[B, 1, 1, S]``: PixArt, Sana) with segment ids; other mask shapes use XLA. Under a mesh
(``jax.set_mesh``) it runs in ``jax.shard_map`` with the batch split over the mesh axes
``data`` and ``fsdp`` and the heads over ``tensor`` (``parallel.mesh``'s names; other axes replicate);
a multi-device program traced without a mesh context cannot partition the kernel.
"""

from __future__ import annotations

import functools

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
_TPU_BLOCK = 128  # the Pallas TPU kernel's default tile along both token axes
_BATCH_MESH_AXES = ("data", "fsdp")
_HEAD_MESH_AXES = ("tensor",)


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
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, implementation: str = "xla"
) -> jax.Array:
    """Softmax attention with scale ``Dh**-0.5``. ``q [B, T, H, Dh]``, ``k, v [B, S, H, Dh]``,
    ``mask`` boolean (True = attend) broadcastable to ``[B, H, T, S]`` -> ``[B, T, H, Dh]``.
    ``implementation``: see the module docstring."""
    check_attention(implementation)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    if implementation == "xla":
        return xla(q, k, v)
    branches = {}
    # The cuDNN branch cannot even be traced without a GPU, so it is offered only on one.
    suits_cudnn = mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
    if jax.default_backend() == "gpu" and (implementation == "flash" or suits_cudnn):
        branches["cuda"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    key_mask = _key_padding_mask(mask, q.shape[0], k.shape[1])
    if mask is None or key_mask is not None:
        branches["tpu"] = functools.partial(_tpu_flash, key_mask=key_mask)
    return jax.lax.platform_dependent(q, k, v, default=xla, **branches)


def _key_padding_mask(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array | None:
    """``mask`` as ``[B, S]`` when it masks keys only (shape ``[B or 1, 1, 1, S]``), else None."""
    if mask is None or mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != kv_len:
        return None
    return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))


def _tpu_flash(q, k, v, *, key_mask):
    """The Pallas TPU flash kernel on BTNH inputs, token axes padded to the tile, in a
    ``shard_map`` when a mesh is set (Mosaic kernels are not partitioned automatically)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import (
        SegmentIds,
        flash_attention,
    )

    b, t, h, _ = q.shape
    s = k.shape[1]
    t_pad, s_pad = -t % _TPU_BLOCK, -s % _TPU_BLOCK
    if key_mask is None and s_pad:
        key_mask = jnp.ones((b, s), bool)

    def local(q, k, v, key_mask):
        to_bhsd = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
        segments = None
        if key_mask is not None:
            kv_ids = jnp.pad(key_mask, ((0, 0), (0, s_pad))).astype(jnp.int32)
            segments = SegmentIds(q=jnp.ones((q.shape[0], t + t_pad), jnp.int32), kv=kv_ids)
        out = flash_attention(to_bhsd(q, t_pad), to_bhsd(k, s_pad), to_bhsd(v, s_pad), segment_ids=segments,
                              sm_scale=q.shape[-1] ** -0.5)
        return out.transpose(0, 2, 1, 3)[:, :t]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, key_mask)
    batch_axes = dividing_axes(mesh, _BATCH_MESH_AXES, b)
    head_axes = dividing_axes(mesh, _HEAD_MESH_AXES, h)
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, head_axes or None, None)
    mask_spec = jax.sharding.PartitionSpec(batch_axes or None, None)
    in_specs = (spec, spec, spec, None if key_mask is None else mask_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(q, k, v, key_mask)


def dividing_axes(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The mesh axes among ``names`` (in mesh order) whose product divides ``size``."""
    axes, product = [], 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if name in names and n > 1 and size % (product * n) == 0:
            axes.append(name)
            product *= n
    return tuple(axes)


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
