"""Gemma-2 (Google, 2024) as transformers' ``Gemma2ForCausalLM``, in Flax NNX.

Parameter paths equal transformers' state-dict keys with the leaf renamed as in every port
(``model.layers.3.self_attn.q_proj.kernel`` <- ``model.layers.3.self_attn.q_proj.weight``,
transposed; ``model.layers.3.input_layernorm.scale`` and ``model.embed_tokens.embedding`` <-
``...weight``), so ``models.convert.load_state_dict`` loads a transformers folder
(``models.transformers_folder.from_transformers``).

What the forward pass reproduces (transformers' ``modeling_gemma2.py``, eager attention):
- the token embedding times ``sqrt(hidden_size)``, the factor rounded to the embedding's storage
  dtype first (transformers' ``embed_scale.to(weight.dtype)``);
- per layer ``x += post_attention_layernorm(attn(input_layernorm(x)))`` then
  ``x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; every RMSNorm computes
  ``x / rms(x) * (1 + w)`` in float32 (``w`` is stored as trained, zero-initialised);
- grouped-query attention (``num_key_value_heads`` shared by ``num_attention_heads //
  num_key_value_heads`` query heads), float32 scores scaled by ``query_pre_attn_scalar ** -0.5`` and
  soft-capped (``cap * tanh(s / cap)``, ``attn_logit_softcapping``), rotary positions (halves
  rotated, ``rope_theta``);
- sliding-window attention on the layers ``layer_types`` names ``"sliding_attention"`` (by default
  the even ones: 0, 2, ...): query ``t`` sees keys ``t - sliding_window < s <= t``; the others
  are causal over the whole sequence;
- ``mlp = down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))``;
- logits ``= norm(x) @ embed_tokens^T`` (tied; an untied ``lm_head`` is supported), soft-capped by
  ``final_logit_softcapping``.

Padding. ``attention_mask [B, L]`` (1 = token, 0 = padding, left padding as transformers batches
prompts) masks padded keys. Positions are ``0 .. L-1`` whatever the mask, as transformers'
forward computes them; pass ``position_ids=positions_from_mask(attention_mask)`` for the positions
``generate`` uses (a left-padded prompt then computes what the unpadded one does). Rows of padded
queries see no key; they come out as transformers' do (uniform attention over all keys) on the
XLA path and differ on the TPU kernel: ignore them.

Options (as on the diffusers ports): ``dtype`` (compute) / ``param_dtype`` (storage); ``remat``
(``models.scan``); ``scan_layers``: every decoder layer has one structure (the layer kind is data:
a window size per layer, picked from a table by a layer counter carried through the scan), so the
whole stack is one ``jax.lax.scan`` over ``num_hidden_layers`` layers whatever ``layer_types``
holds, and checkpoints keep per-layer names (``model.layers.{i}``); ``attention``: ``"xla"``
(scores materialised, float32 softmax), ``"auto"`` / ``"flash"`` (``models.attention``'s dispatch:
on TPU the Pallas *splash* kernel, which takes the local window, the soft cap, grouped heads and
padding as segment ids; chosen when the program is lowered, so an ahead-of-time TPU compile on a
CPU host gets it; on CPU XLA runs; on GPU ``"auto"`` runs XLA and ``"flash"`` raises, as no GPU
kernel takes a soft cap).

Key-value cache (``models.kv_cache``; how ``models.sampler`` decodes): ``init_cache(batch, length)``
preallocates every layer's slots; ``prefill(input_ids, attention_mask, cache)`` writes left-padded
prompts (positions from the mask) and returns the last token's logits only; ``decode_step(tokens,
cache)`` adds one token per row. Sliding-window layers mask by the positions stored in the slots.
The projections run as in the forward pass, so the fake-quantized and frozen students decode too.

Quantization. The seven projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``) are plain ``nnx.Linear`` (what ``quantize_model``
replaces); the embedding, which is also the LM head, is an ``nnx.Embed`` and stays in float.
Logical sharding names: ``vocab``/``embed`` on the embedding, ``(embed, heads)`` on q/k/v,
``(heads, embed)`` on o, ``(embed, mlp)`` / ``(mlp, embed)`` on the MLP, ``norm`` on norm scales.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.models.attention import NO_WINDOW, check_attention, dot_product_attention, eager_attention
from fraqat_jax.models.common import EMBED, HEADS, MLP, NORM, VOCAB, KeySequence, merge_config, no_eager_sharding
from fraqat_jax.models.kv_cache import empty as empty_cache, run_layers, write_positions
from fraqat_jax.models.scan import block_list, check_remat, run_blocks

__all__ = [
    "GEMMA2_DEFAULTS",
    "GEMMA2_PRESETS",
    "Gemma2Attention",
    "Gemma2DecoderLayer",
    "Gemma2ForCausalLM",
    "Gemma2MLP",
    "Gemma2Model",
    "Gemma2RMSNorm",
    "positions_from_mask",
]

#: transformers' ``Gemma2Config`` defaults (the 2B model's sizes); a config.json overrides them. The
#: rotary base is read from ``rope_parameters`` or ``rope_theta`` (default 10000, see ``rope_theta``).
GEMMA2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "layer_types": None,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "use_bidirectional_attention": None,
}

LAYER_TYPES = ("sliding_attention", "full_attention")
_ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def layer_types(config: Mapping[str, Any]) -> tuple[str, ...]:
    """``config["layer_types"]``, or transformers' default: sliding on even layers, full on odd ones."""
    n = config["num_hidden_layers"]
    kinds = config.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    kinds = tuple(kinds)
    if len(kinds) != n or any(k not in LAYER_TYPES for k in kinds):
        raise ValueError(f"layer_types must hold {n} entries among {LAYER_TYPES}, got {list(kinds)}")
    return kinds


def rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (4.x);
    only the default rotary kind is ported."""
    params = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(params, Mapping):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"Gemma2ForCausalLM supports rope_type 'default' only, got {kind!r}")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions of a left-padded batch as transformers' ``generate`` computes them:
    ``cumsum(mask) - 1``, 0 on padding. ``[B, L]`` -> ``[B, L]`` int32."""
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1).astype(jnp.int32)


def _normal(std: float):
    return nnx.initializers.normal(std)


def _linear(n_in: int, n_out: int, axes, *, bias: bool, std: float, rngs, dtype, param_dtype) -> nnx.Linear:
    with no_eager_sharding():
        return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=_normal(std), bias_init=nnx.initializers.zeros_init(),
                          kernel_metadata={"out_sharding": tuple(axes)}, bias_metadata={"out_sharding": (axes[1],)},
                          rngs=rngs)


class Gemma2RMSNorm(nnx.Module):
    """transformers ``Gemma2RMSNorm``: ``x / sqrt(mean(x^2) + eps) * (1 + scale)`` in float32, cast
    back to the input's dtype. ``scale [dim]`` (transformers ``weight``) starts at zero."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        self.eps = eps
        with no_eager_sharding():
            self.scale = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Gemma2MLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``; ``[..., hidden] -> [..., hidden]``."""

    def __init__(self, config: Mapping[str, Any], *, rngs, dtype=None, param_dtype=jnp.float32):
        if config["hidden_activation"] not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation {config['hidden_activation']!r} is not supported: "
                             f"use one of {sorted(_ACTIVATIONS)}")
        self.act = config["hidden_activation"]
        h, m = config["hidden_size"], config["intermediate_size"]
        kw = dict(bias=False, std=config["initializer_range"], rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = _linear(h, m, (EMBED, MLP), **kw)
        self.up_proj = _linear(h, m, (EMBED, MLP), **kw)
        self.down_proj = _linear(m, h, (MLP, EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(_ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, L, H, D]``, ``cos``/``sin`` ``[B or 1, L, D]`` (float32) -> ``x``'s shape and dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + _rotate_half(x32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` ``[B, L, head_dim]`` float32 for integer ``positions [B, L]`` (frequencies
    ``theta ** (-2i / head_dim)``, each repeated over the two halves, as transformers)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def head_dim(config: Mapping[str, Any]) -> int:
    """``config["head_dim"]``, or ``hidden_size // num_attention_heads`` when it is unset."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


class Gemma2Attention(nnx.Module):
    """transformers ``Gemma2Attention``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    Call ``(x [B, L, hidden], cos, sin [B or 1, L, head_dim], key_valid [B, L] | None, window)``
    -> ``[B, L, hidden]``; ``window``: the number of keys each query sees counting itself (an int32
    scalar, traced under a scan; ``NO_WINDOW`` on a full-attention layer), see
    ``models.attention.dot_product_attention``."""

    def __init__(self, config: Mapping[str, Any], *, rngs, dtype=None, param_dtype=jnp.float32):
        self.implementation = "xla"  # see Gemma2ForCausalLM(attention=...)
        h = config["hidden_size"]
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config["num_key_value_heads"]
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        self.head_dim = head_dim(config)
        self.scaling = float(config["query_pre_attn_scalar"]) ** -0.5
        self.softcap = config["attn_logit_softcapping"]
        self.sliding_window = config["sliding_window"]
        self.windows = tuple(sorted({self.sliding_window if kind == "sliding_attention" and self.sliding_window
                                     is not None else NO_WINDOW for kind in layer_types(config)}))
        kw = dict(bias=bool(config["attention_bias"]), std=config["initializer_range"], rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        self.q_proj = _linear(h, self.num_heads * self.head_dim, (EMBED, HEADS), **kw)
        self.k_proj = _linear(h, self.num_kv_heads * self.head_dim, (EMBED, HEADS), **kw)
        self.v_proj = _linear(h, self.num_kv_heads * self.head_dim, (EMBED, HEADS), **kw)
        self.o_proj = _linear(self.num_heads * self.head_dim, h, (HEADS, EMBED), **kw)

    def __call__(self, x, cos, sin, key_valid, window):
        b, n, _ = x.shape
        q = _apply_rope(self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim), cos, sin)
        k = _apply_rope(self.k_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = dot_product_attention(q, k, v, mask, self.implementation, scale=self.scaling, softcap=self.softcap,
                                    window=window, windows=self.windows)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim).astype(x.dtype))

    def cached(self, x, cos, sin, cache, layer, slot, allowed):
        """The call on new tokens ``x [B, T, hidden]`` against a key-value cache: their keys and
        values are written to slots ``slot .. slot + T - 1`` of layer ``layer`` of ``cache``
        (``{"k", "v"}`` ``[layers, B, S, Hkv, D]``; ``layer`` and ``slot`` may be traced), then the
        queries attend to all ``S`` slots under ``allowed [B, T, S]``. -> ``(out [B, T, hidden],
        cache)``."""
        b, n, _ = x.shape
        q = _apply_rope(self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim), cos, sin)
        k = _apply_rope(self.k_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, n, self.num_kv_heads, self.head_dim)
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(slot, jnp.int32), zero, zero)
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), start),
                 "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), start)}
        keys = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
        out = eager_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=allowed[:, None],
                              scale=self.scaling, softcap=self.softcap)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim).astype(x.dtype)), cache


class Gemma2DecoderLayer(nnx.Module):
    """transformers ``Gemma2DecoderLayer`` (sandwich norms around attention and MLP). Call
    ``(x [B, L, hidden], cos, sin, key_valid, window)`` -> ``[B, L, hidden]``."""

    def __init__(self, config: Mapping[str, Any], *, rngs, dtype=None, param_dtype=jnp.float32):
        h, eps = config["hidden_size"], config["rms_norm_eps"]
        self.self_attn = Gemma2Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = Gemma2MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = Gemma2RMSNorm(h, eps=eps, param_dtype=param_dtype)
        self.post_attention_layernorm = Gemma2RMSNorm(h, eps=eps, param_dtype=param_dtype)
        self.pre_feedforward_layernorm = Gemma2RMSNorm(h, eps=eps, param_dtype=param_dtype)
        self.post_feedforward_layernorm = Gemma2RMSNorm(h, eps=eps, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, key_valid, window):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_valid, window))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def cached(self, x, cos, sin, cache, layer, slot, allowed):
        """The call against a key-value cache (``Gemma2Attention.cached``) -> ``(x, cache)``."""
        h, cache = self.self_attn.cached(self.input_layernorm(x), cos, sin, cache, layer, slot, allowed)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache


class Gemma2Model(nnx.Module):
    """transformers ``Gemma2Model``: ``embed_tokens``, ``layers``, ``norm``. Call
    ``(input_ids [B, L], attention_mask [B, L] | None, position_ids [B or 1, L] | None)`` -> final
    hidden states ``[B, L, hidden]`` (after ``norm``)."""

    def __init__(self, config: Mapping[str, Any], *, rngs, dtype=None, param_dtype=jnp.float32,
                 remat: bool | str = False, scan_layers: bool = False):
        self.config = config
        self.remat = check_remat(remat)
        h = config["hidden_size"]
        with no_eager_sharding():
            self.embed_tokens = nnx.Embed(config["vocab_size"], h, dtype=dtype, param_dtype=param_dtype,
                                          embedding_init=_normal(config["initializer_range"]),
                                          embedding_metadata={"out_sharding": (VOCAB, EMBED)}, rngs=rngs)
        layers = [Gemma2DecoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                  for _ in range(config["num_hidden_layers"])]
        self.layers = block_list(layers, scan_layers)
        self.norm = Gemma2RMSNorm(h, eps=config["rms_norm_eps"], param_dtype=param_dtype)
        window = config["sliding_window"]
        self.windows = tuple(window if kind == "sliding_attention" and window is not None else NO_WINDOW
                             for kind in layer_types(config))

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids [B, L], got {input_ids.dtype} {input_ids.shape}")
        b, n = input_ids.shape
        x = self.embed(input_ids)
        key_valid = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (b, n):
                raise ValueError(f"attention_mask must be [B, L] = {(b, n)}, got {attention_mask.shape}")
            key_valid = attention_mask.astype(bool)
        if position_ids is None:
            position_ids = jnp.arange(n, dtype=jnp.int32)[None]
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim != 2 or position_ids.shape[1] != n:
            raise ValueError(f"position_ids must be [B or 1, L] with L = {n}, got {position_ids.shape}")
        cos, sin = rotary_tables(position_ids, head_dim(self.config), rope_theta(self.config))
        windows = jnp.asarray(self.windows, jnp.int32)

        def step(layer, carry, cos, sin, key_valid, windows):
            x, index = carry
            return layer(x, cos, sin, key_valid, windows[index]), index + 1

        x, _ = run_blocks(self.layers, step, (x, jnp.int32(0)), cos, sin, key_valid, windows, remat=self.remat)
        return self.norm(x)

    def embed(self, input_ids):
        """The token embedding times ``sqrt(hidden_size)``, the factor rounded to the embedding's
        storage dtype first (transformers' ``embed_scale.to(weight.dtype)``) and the product in the
        compute dtype."""
        x = self.embed_tokens(input_ids)
        normalizer = jnp.asarray(math.sqrt(self.config["hidden_size"]), self.embed_tokens.param_dtype)
        return (x * normalizer.astype(jnp.promote_types(x.dtype, normalizer.dtype))).astype(x.dtype)

    def cached(self, input_ids, valid, cache):
        """The stack on new tokens against a key-value cache (see ``Gemma2ForCausalLM.init_cache``):
        ``input_ids [B, T]`` with ``valid [B, T]`` (0 on left padding) go to slots ``cache["slot"]``
        onwards -> ``(final hidden states [B, T, hidden], cache)``."""
        positions, key_pos, seen, cache = write_positions(cache, valid)
        query = jnp.maximum(positions, 0)[:, :, None]
        cos, sin = rotary_tables(jnp.maximum(positions, 0), head_dim(self.config), rope_theta(self.config))
        windows = jnp.asarray(self.windows, jnp.int32)

        def step(layer, x, kv, index):
            allowed = seen & (query - key_pos[:, None, :] < windows[index])
            return layer.cached(x, cos, sin, kv, index, cache["slot"], allowed)

        x, kv = run_layers(self.layers, step, self.embed(input_ids), {"k": cache["k"], "v": cache["v"]})
        cache = {**cache, **kv, "slot": cache["slot"] + input_ids.shape[1]}
        return self.norm(x), cache


class Gemma2LMHead(nnx.Module):
    """The output projection of an untied Gemma-2 (``lm_head``): ``kernel [hidden, vocab]``; not an
    ``nnx.Linear``, so quantization leaves it in float as it does the tied one."""

    def __init__(self, hidden: int, vocab: int, *, std: float, rngs, dtype=None, param_dtype=jnp.float32):
        self.dtype = dtype
        with no_eager_sharding():
            self.kernel = nnx.Param(_normal(std)(rngs.params(), (hidden, vocab), param_dtype),
                                    out_sharding=(EMBED, VOCAB))

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        return jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))


class Gemma2ForCausalLM(nnx.Module):
    """Port of transformers ``Gemma2ForCausalLM`` (see the module docstring).

    ``config``: transformers' ``Gemma2Config`` keys (a ``config.json`` as a dict; missing keys take
    ``GEMMA2_DEFAULTS``), kept on ``self.config``. Random init follows transformers': normal
    (``initializer_range``) projections and embedding, zero norm scales.

    Call ``(input_ids [B, L] int, attention_mask [B, L] | None, position_ids [B or 1, L] | None)``
    -> logits ``[B, L, vocab_size]`` in the compute dtype (soft-capped in float32).
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
        cfg = merge_config(GEMMA2_DEFAULTS, config, "Gemma2ForCausalLM")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("Gemma2ForCausalLM supports causal attention only, got use_bidirectional_attention=True")
        layer_types(cfg)
        rope_theta(cfg)
        self.config = cfg
        self.scan_layers = scan_layers
        self.attention = check_attention(attention)
        kw = dict(rngs=KeySequence(rngs), dtype=dtype, param_dtype=param_dtype)
        self.model = Gemma2Model(cfg, remat=remat, scan_layers=scan_layers, **kw)
        self.lm_head = (None if cfg["tie_word_embeddings"] else
                        Gemma2LMHead(cfg["hidden_size"], cfg["vocab_size"], std=cfg["initializer_range"], **kw))
        for _, node in nnx.iter_graph(self):
            if isinstance(node, Gemma2Attention):
                node.implementation = attention

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        return self.head(self.model(input_ids, attention_mask, position_ids))

    def head(self, x):
        """Logits of final hidden states ``x [..., hidden]``: the LM head, soft-capped in float32."""
        logits = self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        cap = self.config["final_logit_softcapping"]
        if cap is not None:
            logits = (jnp.tanh(logits.astype(jnp.float32) / cap) * cap).astype(logits.dtype)
        return logits

    # -- key-value cache ---------------------------------------------------------------------------

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> dict:
        """An empty key-value cache of ``length`` slots per row, preallocated for every layer (as the
        JAX samplers keep theirs, e.g. tunix's and ``gemma``'s ``gm.text.Sampler``):
        ``{"k", "v"}`` ``[num_hidden_layers, batch, length, num_key_value_heads, head_dim]`` (in
        ``dtype``, default the compute dtype), ``"pos" [batch, length]`` int32 (the position of the
        token each slot holds, -1 while empty or padding), ``"slot"`` (the next slot to write) and
        ``"next" [batch]`` (each row's next position). Sliding-window layers keep every slot and
        mask by the stored positions. A pytree: it goes through ``jit`` and can be donated."""
        embed = self.model.embed_tokens
        return empty_cache(self.config["num_hidden_layers"], batch, length, self.config["num_key_value_heads"],
                              head_dim(self.config), dtype or embed.dtype or embed.param_dtype)

    def prefill(self, input_ids, attention_mask, cache):
        """Writes a left-padded batch of prompts (``input_ids``, ``attention_mask`` ``[B, P]``; 0 on
        padding) to an empty ``cache`` -> ``(logits of the last slot [B, vocab], cache)``. Positions
        come from the mask (``positions_from_mask``), so a padded row computes what it computes
        alone; the LM head runs on the last token only."""
        x, cache = self.model.cached(jnp.asarray(input_ids), attention_mask, cache)
        return self.head(x[:, -1]), cache

    def decode_step(self, tokens, cache):
        """One new token per row (``tokens [B]``) at each row's next position -> ``(logits [B,
        vocab], cache)``."""
        tokens = jnp.asarray(tokens).reshape(-1, 1)
        x, cache = self.model.cached(tokens, jnp.ones(tokens.shape, bool), cache)
        return self.head(x[:, -1]), cache


# Published sizes (google/gemma-2-2b, -9b, -27b config.json; the -it models share them).
_GEMMA2_COMMON = {"vocab_size": 256000, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                  "max_position_embeddings": 8192, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
GEMMA2_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma-2-2b": ("Gemma2ForCausalLM", {**_GEMMA2_COMMON, "hidden_size": 2304, "intermediate_size": 9216,
                                         "num_hidden_layers": 26, "num_attention_heads": 8,
                                         "num_key_value_heads": 4}),
    "gemma-2-9b": ("Gemma2ForCausalLM", {**_GEMMA2_COMMON, "hidden_size": 3584, "intermediate_size": 14336,
                                         "num_hidden_layers": 42, "num_attention_heads": 16,
                                         "num_key_value_heads": 8}),
    "gemma-2-27b": ("Gemma2ForCausalLM", {**_GEMMA2_COMMON, "hidden_size": 4608, "intermediate_size": 36864,
                                          "num_hidden_layers": 46, "num_attention_heads": 32,
                                          "num_key_value_heads": 16, "head_dim": 128,
                                          "query_pre_attn_scalar": 144}),
}
