"""Building blocks shared by the diffusion-transformer ports (DiT, SD3, PixArt, Sana, Flux).

Every module mirrors a diffusers module of the same name so that the NNX parameter path equals
the diffusers state-dict key with ``weight`` renamed (``kernel`` for Linear/Conv, ``scale`` for
norms, ``embedding`` for embedding tables). Linear layers are plain ``nnx.Linear`` and convolutions
plain ``nnx.Conv`` so ``fraqat_jax.quantize_model`` finds them.

Conventions
- Activations are channels-last: tokens ``[B, N, D]``; images enter ports as ``[B, C, H, W]``
  (diffusers layout) and ``PatchEmbed`` turns them into tokens.
- ``dtype`` is the compute dtype (``None``: follow the inputs/params, as Flax does),
  ``param_dtype`` the storage dtype of parameters. Norm statistics, softmax and sinusoidal
  embeddings are computed in float32 whatever ``dtype`` is.
- Parameters carry logical sharding names in their ``out_sharding`` metadata
  (``embed``, ``mlp``, ``heads``, ``vocab``, ``norm``); map them to mesh axes with
  ``flax.linen.logical_axis_rules`` + ``nnx.get_partition_spec``. Construction never shards
  eagerly (see ``no_eager_sharding``), so models build without a mesh.
- Random init follows torch's defaults (what a freshly built diffusers model has): Linear/Conv
  kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), embeddings ~ N(0, 1). ``zero=True``
  gives the adaLN-Zero initialisation (zero kernel and bias) used for modulation and output
  layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any

# Logical axis names used on parameters.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
VOCAB = "vocab"
NORM = "norm"


class Buffer(nnx.Variable):
    """A non-trainable array saved in diffusers checkpoints (a persistent torch buffer,
    e.g. SD3's ``pos_embed.pos_embed``). Not an ``nnx.Param``: optimizers and parameter counts
    skip it, the loader fills it."""


def no_eager_sharding():
    """Context in which ports build their parameters: logical names are recorded as metadata
    only; placing them on a mesh is the trainer's job."""
    return nnx.use_eager_sharding(False)


class KeySequence:
    """Stand-in for ``nnx.Rngs`` while a port builds its layers: ``params()`` folds a Python
    counter into one key. ``nnx.Rngs`` keeps its counter in a Variable, and updating that under
    ``nnx.eval_shape`` makes JAX format an error message per draw (seconds for SD3.5-Medium);
    this keeps abstract construction cheap. Deterministic for a given ``rngs`` state."""

    def __init__(self, rngs: "nnx.Rngs | KeySequence"):
        self.key = rngs.params()
        self.count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key

    __call__ = params


def torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = (EMBED, MLP),
    zero: bool = False,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """``nnx.Linear`` with torch's default init (or zeros) and logical names ``axes`` on the
    kernel ``[in_features, out_features]``; the bias ``[out_features]`` gets ``axes[1]``."""
    zeros = nnx.initializers.zeros_init()
    with no_eager_sharding():
        return nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=zeros if zero else torch_kernel_init,
            bias_init=zeros if zero else torch_bias_init(in_features),
            kernel_metadata={"out_sharding": tuple(axes)},
            bias_metadata={"out_sharding": (axes[1],)},
            rngs=rngs,
        )


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps diffusers' list indices (e.g. the Dropout at
    ``ff.net.1`` and ``attn.to_out.1``; dropout is 0 in every model ported here)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32 (torch ``nn.LayerNorm`` semantics).

    ``elementwise_affine`` adds ``scale`` (diffusers ``weight``) and, if ``bias``, ``bias``,
    both ``[dim]``. Input ``[..., dim]`` -> output of the same shape in ``dtype`` (or the input's).
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        with no_eager_sharding():
            self.scale = (
                nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine
                else None
            )
            self.bias = (
                nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine and bias
                else None
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (diffusers ``RMSNorm``): ``x / sqrt(mean(x^2) + eps) * scale``.

    Mean of squares in float32. ``scale`` is ``[dim]`` (diffusers ``weight``), absent when
    ``elementwise_affine=False``. Input ``[..., dim]`` -> same shape.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        with no_eager_sharding():
            self.scale = (
                nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(NORM,))
                if elementwise_affine
                else None
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(out_dtype)


def count_params(model_or_state: Any) -> int:
    """Number of scalars in the ``nnx.Param`` leaves of a model or state (works on ``nnx.eval_shape``
    output, so no memory is spent)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def call_block(block: nnx.Module, remat: bool, *args: Any, **static: Any) -> Any:
    """``block(*args)``, rematerialised (``jax.checkpoint``: activations recomputed in the backward
    pass) when ``remat``. Positional arguments must be arrays or None; keyword arguments are
    passed through as Python constants (e.g. a token grid's height and width).

    The rematerialised call is a pure function of the block's state (split/merge around
    ``jax.checkpoint``), so it also works when the parameters are closed over by an inner
    transform (e.g. a frozen teacher called inside ``jax.grad`` over the student), where
    ``nnx.remat`` would try to write the state back across trace levels."""
    if remat:
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a, **static))(state, *args)
    return block(*args, **static)


class ModelConfig(dict):
    """A port's diffusers config: a ``dict`` (JSON-serialisable, ``cfg["num_layers"]``) that is
    read-only and hashable, so graph definitions holding it can be static arguments of ``jax.jit``."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("model config is read-only; build a new model from a modified dict(config)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self):
        return (ModelConfig, (dict(self),))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def merge_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, class_name: str) -> ModelConfig:
    """``defaults`` updated with ``config`` (diffusers keys) plus ``_class_name``, lists turned
    into tuples. Keys starting with ``_`` (diffusers bookkeeping) are kept but not used."""
    merged = dict(defaults)
    merged.update(dict(config or {}))
    merged["_class_name"] = class_name
    return ModelConfig({k: _hashable(v) if isinstance(v, list) else v for k, v in merged.items()})
