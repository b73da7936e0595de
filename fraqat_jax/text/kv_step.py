"""Gemma-2 as a phone runtime runs it: one fixed-shape step of ``N`` new tokens against a key-value
cache of ``C - N`` earlier positions, everything position-dependent computed by the host.

:class:`Gemma2KVStep` wraps a (quantized) ``Gemma2ForCausalLM`` and calls its own submodules
(embedding, norms, the q/k/v/o projections, the MLP) in the layout of Qualcomm AI Hub's language
models:

* ``input_ids [1, N]`` int32;
* ``attention_mask [1, 1, N, C]`` float32, additive (0 where a query sees a key, a large negative value
  elsewhere) for the full-attention layers, and ``sliding_attention_mask`` of the same shape for
  the sliding-window layers (the host applies the window); key columns ``0 .. C-N-1`` are the
  cache slots, ``C-N .. C-1`` the new tokens;
* ``position_cos`` / ``position_sin [1, N, head_dim]`` float32: the rotary tables of the new
  tokens' positions;
* ``past_key_{l}_in [1, Hkv, head_dim, C-N]`` (keys transposed) and
  ``past_value_{l}_in [1, Hkv, C-N, head_dim]`` per layer ``l``.

It returns ``logits [1, N, vocab]`` (soft-capped) and, per layer, ``past_key_{l}_out [1, Hkv,
head_dim, N]`` and ``past_value_{l}_out [1, Hkv, N, head_dim]``: the rotated keys and the values
of the new tokens only, which the host writes into its cache.

The host side (masks, rotary tables, the cache) is ``fraqat_jax.deploy.text``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.gemma2 import head_dim, layer_types, rope_theta

__all__ = ["Gemma2KVStep", "geometry", "input_names", "output_names"]



def geometry(config) -> dict:
    """What the host needs of ``config`` to feed the step: ``layers``, ``kv_heads``, ``head_dim``,
    ``rope_theta``, ``sliding_window`` (None without sliding layers), ``layer_types``."""
    kinds = layer_types(config)
    window = config.get("sliding_window") if "sliding_attention" in kinds else None
    return {"layers": int(config["num_hidden_layers"]), "kv_heads": int(config["num_key_value_heads"]),
            "head_dim": int(head_dim(config)), "rope_theta": rope_theta(config),
            "sliding_window": None if window is None else int(window), "layer_types": list(kinds),
            "vocab_size": int(config["vocab_size"]), "hidden_size": int(config["hidden_size"])}


def input_names(config, *, sliding: bool | None = None) -> list[str]:
    n = config["num_hidden_layers"]
    if sliding is None:
        sliding = geometry(config)["sliding_window"] is not None
    names = ["input_ids", "attention_mask"] + (["sliding_attention_mask"] if sliding else [])
    names += ["position_cos", "position_sin"]
    for i in range(n):
        names += [f"past_key_{i}_in", f"past_value_{i}_in"]
    return names


def output_names(config) -> list[str]:
    names = ["logits"]
    for i in range(config["num_hidden_layers"]):
        names += [f"past_key_{i}_out", f"past_value_{i}_out"]
    return names


class Gemma2KVStep(nnx.Module):
    """One cached step of ``model`` (see the module docstring). Call with the inputs by name;
    returns a dict of the outputs by name."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.kinds = layer_types(cfg)
        self.window = cfg.get("sliding_window")

    def geometry(self) -> dict:
        """:func:`geometry` of the wrapped model's config."""
        return geometry(self.model.config)

    def __call__(self, **inputs):
        cfg = self.model.config
        core = self.model.model
        ids = inputs["input_ids"]
        cos, sin = inputs["position_cos"], inputs["position_sin"]
        x = core.embed_tokens(ids)
        x = x * jnp.asarray(math.sqrt(cfg["hidden_size"]), x.dtype)
        outs = {}
        for i, layer in enumerate(core.layers):
            sliding = self.kinds[i] == "sliding_attention" and self.window is not None
            mask = inputs["sliding_attention_mask" if sliding else "attention_mask"]
            h, k_new, v_new = cached_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask,
                                         inputs[f"past_key_{i}_in"], inputs[f"past_value_{i}_in"])
            x = x + layer.post_attention_layernorm(h)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            outs[f"past_key_{i}_out"], outs[f"past_value_{i}_out"] = k_new, v_new
        x = core.norm(x)
        logits = core.embed_tokens.attend(x) if self.model.lm_head is None else self.model.lm_head(x)
        cap = cfg["final_logit_softcapping"]
        if cap is not None:
            logits = jnp.tanh(logits.astype(jnp.float32) / cap) * cap
        outs["logits"] = logits.astype(jnp.float32)
        return outs


def _rope(x, cos, sin):
    """``x [1, N, H, D]`` rotated by ``cos``/``sin`` ``[1, N, D]`` (halves rotated, as the port)."""
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def cached_attention(attn, x, cos, sin, mask, past_k, past_v):
    """``(out [1, N, hidden], keys [1, Hkv, D, N], values [1, Hkv, N, D])``: scores over the cache
    slots and the new tokens, additive ``mask [1, 1, N, C]``, soft cap, float32 softmax."""
    b, n, _ = x.shape
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    g = hq // hkv
    q = _rope(attn.q_proj(x).reshape(b, n, hq, d), cos, sin) * jnp.float32(attn.scaling)
    k = _rope(attn.k_proj(x).reshape(b, n, hkv, d), cos, sin)
    v = attn.v_proj(x).reshape(b, n, hkv, d).astype(jnp.float32)
    k_new = jnp.transpose(k, (0, 2, 3, 1))  # [1, Hkv, D, N]
    v_new = jnp.transpose(v, (0, 2, 1, 3))  # [1, Hkv, N, D]
    keys = jnp.concatenate([past_k.astype(jnp.float32), k_new], axis=-1)  # [1, Hkv, D, C]
    values = jnp.concatenate([past_v.astype(jnp.float32), v_new], axis=-2)  # [1, Hkv, C, D]
    qg = jnp.transpose(q.reshape(b, n, hkv, g, d), (0, 2, 3, 1, 4)).reshape(b, hkv, g * n, d)
    scores = jnp.matmul(qg, keys)  # [1, Hkv, G*N, C]
    if attn.softcap is not None:
        scores = jnp.tanh(scores / attn.softcap) * attn.softcap
    scores = scores.reshape(b, hkv, g, n, -1) + mask[:, :, None]  # mask [1, 1, 1, N, C]
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, hkv, g * n, -1)
    out = jnp.matmul(probs, values).reshape(b, hkv, g, n, d)  # [1, Hkv, G, N, D]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, n, hq * d)
    return attn.o_proj(out.astype(x.dtype)), k_new, v_new

