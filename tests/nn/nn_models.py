"""Tiny NNX models for the fraqat_jax.nn tests: an MLP (layers in an nnx.List and a python list)
and a transformer block written the diffusers way (attn.to_q/k/v, attn.to_out.0, ff.net.0.proj,
ff.net.2)."""

import jax
import numpy as np
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, dims=(16, 32, 32, 8), *, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.gelu(x)
        return x


class Attention(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.heads = heads
        self.to_q = nnx.Linear(dim, dim, rngs=rngs)
        self.to_k = nnx.Linear(dim, dim, rngs=rngs)
        self.to_v = nnx.Linear(dim, dim, rngs=rngs)
        self.to_out = nnx.data([nnx.Linear(dim, dim, rngs=rngs)])  # a plain python list, as ports do

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d)
        return self.to_out[0](out)


class GELUProj(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.proj = nnx.Linear(dim, hidden, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.net = nnx.List([GELUProj(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)])

    def __call__(self, x):
        return self.net[1](self.net[0](x))


class Block(nnx.Module):
    def __init__(self, dim=32, heads=4, hidden=64, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = Attention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.ff = FeedForward(dim, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Transformer(nnx.Module):
    def __init__(self, dim=32, depth=2, *, rngs):
        self.proj_in = nnx.Linear(8, dim, rngs=rngs)
        self.transformer_blocks = nnx.List([Block(dim, rngs=rngs) for _ in range(depth)])
        self.proj_out = nnx.Linear(dim, 8, rngs=rngs)

    def __call__(self, x):
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        return self.proj_out(x)


TRANSFORMER_LINEARS = sorted(
    [f"transformer_blocks.{i}.{name}" for i in range(2) for name in
     ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.1")]
    + ["proj_in", "proj_out"])


def np_sym_quant(w, bits, axis=None):
    """float64 numpy reference of the symmetric narrow-range quantizer (per tensor or keep ``axis``)."""
    w = np.asarray(w, np.float64)
    red = None if axis is None else tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = np.max(np.abs(w), axis=red, keepdims=True)
    scale = amax / (2.0 ** (bits - 1) - 1)
    top = np.floor(2.0 ** (bits - 1))
    codes = np.clip(np.round(w / scale), -top, top - 1)
    return codes * scale, codes, scale


def np_token_quant(x, bits):
    """float64 numpy reference of dynamic per-token asymmetric (min/max) activation quantization."""
    x = np.asarray(x, np.float64)
    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    scale = (hi - lo) / (2.0**bits - 1)
    codes = np.clip(np.round((x - lo) / scale), 0, np.floor(2.0**bits) - 1)
    return codes * scale + lo
