"""Activation functions and feed-forward blocks, named like diffusers' ``activations.py`` and
the ``FeedForward`` of its ``attention.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.common import EMBED, MLP, Dtype, Identity, linear

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str):
    """Activation function by diffusers name (``silu``, ``gelu``, ``gelu_tanh``, ...)."""
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------


class GELU(nnx.Module):
    """``proj`` then GELU (tanh approximation if ``approximate == "tanh"``). ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, approximate: str = "none", bias: bool = True, **kw):
        self.approximate = approximate == "tanh"
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nnx.Module):
    """``proj`` to ``2 * dim_out`` then ``a * gelu(gate)`` (exact GELU). ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, 2 * dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class SwiGLU(nnx.Module):
    """``proj`` to ``2 * dim_out`` then ``a * silu(gate)``. ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, 2 * dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.silu(gate)


class ApproximateGELU(nnx.Module):
    """``proj`` then ``x * sigmoid(1.702 x)``. ``[..., dim_in] -> [..., dim_out]``."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, **kw):
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x * jax.nn.sigmoid(1.702 * x)


class LinearActivation(nnx.Module):
    """``proj`` then a named activation (diffusers ``LinearActivation``)."""

    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True, activation: str = "silu", **kw):
        self.activation = activation
        self.proj = linear(dim_in, dim_out, use_bias=bias, axes=(EMBED, MLP), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return get_activation(self.activation)(self.proj(x))


class FeedForward(nnx.Module):
    """Transformer MLP (diffusers ``FeedForward``): ``net.0`` activation-with-projection
    (``dim -> inner_dim``), ``net.1`` dropout placeholder, ``net.2`` Linear ``inner_dim -> dim_out``.

    ``activation_fn`` in {"gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu",
    "linear-silu"}; ``inner_dim`` defaults to ``mult * dim``. ``[..., dim] -> [..., dim_out]``.
    """

    _ACTS = {
        "gelu": lambda i, o, b, kw: GELU(i, o, bias=b, **kw),
        "gelu-approximate": lambda i, o, b, kw: GELU(i, o, approximate="tanh", bias=b, **kw),
        "geglu": lambda i, o, b, kw: GEGLU(i, o, bias=b, **kw),
        "geglu-approximate": lambda i, o, b, kw: ApproximateGELU(i, o, bias=b, **kw),
        "swiglu": lambda i, o, b, kw: SwiGLU(i, o, bias=b, **kw),
        "linear-silu": lambda i, o, b, kw: LinearActivation(i, o, bias=b, activation="silu", **kw),
    }

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        mult: float = 4,
        activation_fn: str = "geglu",
        inner_dim: int | None = None,
        bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if activation_fn not in self._ACTS:
            raise ValueError(f"Unknown activation_fn {activation_fn!r}; supported: {sorted(self._ACTS)}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner_dim = inner_dim if inner_dim is not None else int(dim * mult)
        self.net = nnx.List(
            [
                self._ACTS[activation_fn](dim, inner_dim, bias, kw),
                Identity(),
                linear(inner_dim, dim_out if dim_out is not None else dim, use_bias=bias, axes=(MLP, EMBED), **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x
