"""The key-value cache of the Gemma-2 port (``models.gemma2``): preallocated slots for every layer,
masked by the positions stored in them.

A cache is a dict (a pytree: it goes through ``jit`` and can be donated): ``"k"``, ``"v"``
``[layers, B, S, kv_heads, head_dim]``, ``"pos" [B, S]`` int32 (the position of the token a slot
holds, -1 while empty or padding), ``"slot"`` (the next slot to write, shared by every row: a batch
of left-padded prompts fills the same slots) and ``"next" [B]`` (each row's next position). As in
tunix's sampler and ``gemma``'s ``gm.text.Sampler``, prompts and new tokens are written in place
with ``dynamic_update_slice``; unlike a slot-indexed window, the sliding window here compares
stored *positions*, so left padding (which shifts a row's slots ahead of its positions) neither
widens nor narrows it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.scan import ScannedBlocks

__all__ = ["empty", "run_layers", "write_positions"]


def empty(layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """An empty cache of ``length`` slots per row (see the module docstring)."""
    shape = (int(layers), int(batch), int(length), int(kv_heads), int(head_dim))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((int(batch), int(length)), -1, jnp.int32), "slot": jnp.zeros((), jnp.int32),
            "next": jnp.zeros((int(batch),), jnp.int32)}


def write_positions(cache: dict, valid):
    """Positions of ``T`` new tokens per row (``valid [B, T]``, 0 on left padding) written at slots
    ``cache["slot"]`` onwards -> ``(positions [B, T], key positions [B, S], seen [B, T, S], cache)``:
    a position continues its row's count (``positions_from_mask`` on a first prompt), ``seen`` allows
    the filled slots at or before each query's position (causal; a window is ``query - key <
    window`` on top), and the cache has its ``pos`` and ``next`` updated (its ``slot`` not yet)."""
    valid = jnp.asarray(valid).astype(bool)
    positions = cache["next"][:, None] + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    stored = jnp.where(valid, positions, -1).astype(jnp.int32)
    key_pos = jax.lax.dynamic_update_slice(cache["pos"], stored, (jnp.zeros((), jnp.int32), cache["slot"]))
    query = jnp.maximum(positions, 0)[:, :, None]
    seen = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query)
    cache = {**cache, "pos": key_pos, "next": cache["next"] + jnp.sum(valid, axis=1, dtype=jnp.int32)}
    return positions, key_pos, seen, cache


def run_layers(layers, step, x, kv: dict):
    """``(x, kv) = step(layer, x, kv, index)`` over a block list (an ``nnx.List``, unrolled, or
    ``ScannedBlocks``, one ``jax.lax.scan`` per stack with the layer index carried), the whole cache
    in the carry so each layer updates its slice in place."""
    if isinstance(layers, ScannedBlocks):
        for stack in layers.stacks:
            graphdef, state = nnx.split(stack.block)

            def body(carry, layer_state, graphdef=graphdef):
                x, kv, index = carry
                x, kv = step(nnx.merge(graphdef, layer_state), x, kv, index)
                return (x, kv, index + 1), None

            (x, kv, _), _ = jax.lax.scan(body, (x, kv, jnp.int32(stack.start)), state)
        return x, kv
    for index, layer in enumerate(layers):
        x, kv = step(layer, x, kv, jnp.int32(index))
    return x, kv
