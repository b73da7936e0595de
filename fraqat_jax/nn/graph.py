"""Model-graph helpers of ``nn/``: module path strings, finding layers, replacing a child module.

A module's path is its attribute names and list indices from the root joined by ``"."``
(``transformer_blocks.0.attn.to_q``), the diffusers key prefix. ``rules`` and ``freeze`` swap
layers through :func:`replace_child`; everything that lists quantized layers uses
:func:`quantized_layers`.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx

from fraqat_jax.nn.layers import QUANT_LAYERS


def path_string(path: Sequence[Any]) -> str:
    """``("transformer_blocks", 0, "attn")`` -> ``"transformer_blocks.0.attn"``."""
    return ".".join(str(p) for p in path)


def child(obj, key):
    """The child of a module (attribute) or of a list or dict (item) under ``key``."""
    if isinstance(key, str) and not isinstance(obj, (dict, nnx.Dict)):
        return getattr(obj, key)
    return obj[key]


def replace_child(parent, key, new, path: str):
    """Puts ``new`` where ``parent[key]`` (or ``parent.key``) is; ``path`` names it in errors."""
    if isinstance(parent, tuple):
        raise TypeError(f"cannot replace layer {path!r}: it sits in a tuple; use a list or nnx.List")
    if isinstance(key, str) and not isinstance(parent, (dict, nnx.Dict)):
        setattr(parent, key, new)
    else:
        parent[key] = new


def find_layers(model, types: tuple[type, ...], exact: bool):
    """``(path tuple, node)`` of every node of ``types`` (exact type or subclass), sorted by path."""
    out = []
    for path, node in nnx.iter_graph(model):
        if (type(node) in types) if exact else isinstance(node, types):
            out.append((path, node))
    out.sort(key=lambda item: [str(p) for p in item[0]])
    return out


def quantized_layers(model) -> list[tuple[str, Any]]:
    """``(path, layer)`` for every quantized layer of ``model``, sorted by path."""
    return [(path_string(p), layer) for p, layer in find_layers(model, QUANT_LAYERS, exact=False)]


def walk_to(model, path: Sequence[Any]):
    """The parent module of the node at ``path`` (a tuple of keys from ``nnx.iter_graph``)."""
    parent = model
    for key in path[:-1]:
        parent = child(parent, key)
    return parent
