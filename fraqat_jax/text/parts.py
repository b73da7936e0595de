"""Gemma-2 in parts by layers, as a phone runtime loads a model too large for one HTP context.

A part is a range of decoder layers with the hidden states as its input and output, so that each
part is traced, quantized, compiled and loaded on its own (in its own process, with its own
context binary). The token embedding is looked up by the host (a row of the table times
``sqrt(hidden_size)``, :func:`host_embed`), so no part holds the 256k-row table as a ``Gather``.

* :class:`Gemma2KVPart`: layers ``start .. stop - 1`` of the cached step of
  :class:`fraqat_jax.text.kv_step.Gemma2KVStep`, in its layout (``attention_mask`` /
  ``sliding_attention_mask [1, 1, N, C]``, ``position_cos`` / ``position_sin``,
  ``past_key_{l}_in`` / ``past_value_{l}_in`` with ``l`` the layer's index in the whole model).
  Input ``hidden_states [1, N, hidden]``; output ``hidden_states_out`` and the layers' new keys and
  values, or, for the last part (``head`` given), the final norm, the LM head and the soft cap:
  ``logits``. A part with no layers and a head is the LM head alone.
* :class:`Gemma2EncoderPart`: layers of the text encoder's forward (``Gemma2Model.__call__``, no
  cache): ``(hidden_states [1, L, hidden], attention_mask [1, L] float 0/1, position_cos,
  position_sin [1, L, head_dim]) -> hidden states`` (after the final norm for the last part).

Chained, the parts compute what the whole model computes (the host embedding first).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.models.gemma2 import NO_WINDOW, head_dim, layer_types, rope_theta, rotary_tables
from fraqat_jax.text.kv_step import cached_attention

__all__ = ["Gemma2EncoderPart", "Gemma2KVPart", "host_embed", "host_rotary", "split_layers"]


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` layer ranges covering ``num_layers``, sizes differing
    by at most one (the larger first); ValueError for a count outside ``[1, num_layers]``."""
    if not isinstance(parts, (int, np.integer)) or not 1 <= parts <= num_layers:
        raise ValueError(f"parts must be an integer in [1, {num_layers}] (the layers), got {parts!r}")
    base, extra = divmod(num_layers, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append((start, stop))
        start = stop
    return out


def host_embed(table: np.ndarray, ids, hidden_size: int) -> np.ndarray:
    """The first part's input: rows ``ids [1, N]`` of the embedding ``table [vocab, hidden]`` times
    ``sqrt(hidden_size)`` (the factor rounded to the table's dtype, as ``Gemma2Model.embed``), float32."""
    table = np.asarray(table)
    factor = np.asarray(math.sqrt(hidden_size), table.dtype)
    return (table[np.asarray(ids)] * factor).astype(np.float32)


def host_rotary(positions, config) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin) [1, N, head_dim]`` float32 of integer ``positions [N]`` for ``config``."""
    cos, sin = rotary_tables(jnp.asarray(np.asarray(positions, np.int32))[None], head_dim(config), rope_theta(config))
    return np.asarray(cos, np.float32), np.asarray(sin, np.float32)


class Gemma2KVPart(nnx.Module):
    """Layers ``layers`` (decoder layers of a Gemma-2 whose ``config`` is the whole model's) at
    indices ``start ..`` of the whole model, as one cached step (module doc). ``head``: a callable
    ``[1, N, hidden] -> [1, N, vocab]`` (e.g. an ``nnx.Linear`` holding the tied table
    transposed), with ``norm`` the final norm: the last part."""

    def __init__(self, config, layers: Sequence, start: int, *, norm=None, head=None):
        kinds = layer_types(config)
        self.layers = nnx.List(list(layers))
        self.start = int(start)
        stop = self.start + len(self.layers)
        if not 0 <= self.start <= stop <= len(kinds):
            raise ValueError(f"layers {self.start}..{stop - 1} are outside the model's {len(kinds)} layers")
        if (norm is None) != (head is None):
            raise ValueError("the last part needs both the final norm and the head")
        window = config.get("sliding_window")
        self.sliding = [kinds[i] == "sliding_attention" and window is not None for i in range(self.start, stop)]
        self.norm, self.head = norm, head
        self.cap = config.get("final_logit_softcapping")

    def __call__(self, **inputs):
        x = inputs["hidden_states"]
        cos, sin = (inputs["position_cos"], inputs["position_sin"]) if len(self.layers) else (None, None)
        outs = {}
        for j, layer in enumerate(self.layers):
            i = self.start + j
            mask = inputs["sliding_attention_mask" if self.sliding[j] else "attention_mask"]
            h, k_new, v_new = cached_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask,
                                         inputs[f"past_key_{i}_in"], inputs[f"past_value_{i}_in"])
            x = x + layer.post_attention_layernorm(h)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            outs[f"past_key_{i}_out"], outs[f"past_value_{i}_out"] = k_new, v_new
        if self.head is None:
            outs["hidden_states_out"] = x.astype(jnp.float32)
            return outs
        logits = self.head(self.norm(x)).astype(jnp.float32)
        if self.cap is not None:
            logits = jnp.tanh(logits / self.cap) * self.cap
        outs["logits"] = logits
        return outs


class Gemma2EncoderPart(nnx.Module):
    """Layers ``layers`` at indices ``start ..`` of the text encoder's forward (``Gemma2Model``
    without its embedding; module doc); ``norm``: the final norm (the last part)."""

    def __init__(self, config, layers: Sequence, start: int, *, norm=None):
        kinds = layer_types(config)
        self.layers = nnx.List(list(layers))
        window = config.get("sliding_window")
        self.windows = [window if kinds[i] == "sliding_attention" and window is not None else NO_WINDOW
                        for i in range(start, start + len(self.layers))]
        self.norm = norm

    def __call__(self, hidden_states, attention_mask, position_cos, position_sin):
        x = hidden_states
        key_valid = attention_mask.astype(bool)
        for layer, window in zip(self.layers, self.windows):
            x = layer(x, position_cos, position_sin, key_valid, jnp.int32(window))
        return x if self.norm is None else self.norm(x)
