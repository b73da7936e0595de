"""Sana's deep-compression autoencoder (DC-AE) as diffusers' ``AutoencoderDC``, in Flax NNX.

Residual autoencoding: each resolution change has a parameter-free shortcut (space-to-channel
pixel (un)shuffle with channel averaging / repeating) beside its conv; stages are ``ResBlock``
(conv-act-conv-norm) or ``EfficientViTBlock`` (ReLU multi-scale linear attention + GLUMBConv).

Layout: ``encode``/``decode`` take and return NCHW arrays like diffusers (images
``[B, in_channels, H, W]``, latents ``[B, latent_channels, H/f, W/f]`` with
``f = 2 ** (len(block_out_channels) - 1)``, 32 for Sana's f32c32); inside, NHWC. Channel
orderings of pixel (un)shuffle, ``repeat_interleave`` and the attention's head split follow
torch's NCHW definitions exactly, so parameters load unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.activations import get_activation
from fraqat_jax.models.autoencoder_kl import conv2d, nchw_to_nhwc, nhwc_to_nchw, upsample_nearest
from fraqat_jax.models.common import Buffer, KeySequence, RMSNorm, call_block, linear, merge_config

AUTOENCODER_DC_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

_SANA_STAGES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3

# Sana's DC-AE (``mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers``), for shapes and tests.
DC_PRESETS: dict[str, dict[str, Any]] = {
    "DC-AE-f32c32-Sana-1.0": {
        "latent_channels": 32, "encoder_block_types": _SANA_STAGES, "decoder_block_types": _SANA_STAGES,
        "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
        "downsample_block_type": "Conv", "upsample_block_type": "interpolate", "scaling_factor": 0.41407,
    },
}

_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_NORM_TYPES = ("rms_norm", "batch_norm")


# ----------------------------------------------------------------------------------------------
# Space <-> channel rearrangements on NHWC with torch's NCHW channel order
# ----------------------------------------------------------------------------------------------


def pixel_unshuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """``F.pixel_unshuffle``: ``[B, H, W, C]`` -> ``[B, H/r, W/r, C*r*r]``, channel ``c*r*r + i*r + j``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """``F.pixel_shuffle``: ``[B, h, w, C*r*r]`` -> ``[B, h*r, w*r, C]`` (inverse of ``pixel_unshuffle``)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def channel_group_mean(x: jax.Array, group: int) -> jax.Array:
    """``x.unflatten(1, (-1, group)).mean(2)``: mean over consecutive groups of channels."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group).mean(axis=-1)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class BiasedRMSNorm(RMSNorm):
    """diffusers ``RMSNorm(dim, eps, elementwise_affine=True, bias=True)`` over the last axis:
    ``x / sqrt(mean(x^2) + eps) * scale + bias``."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32):
        super().__init__(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) + self.bias[...].astype(self.dtype or x.dtype)


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` in eval mode (running statistics), over the last axis of NHWC.
    ``running_mean``/``running_var``/``num_batches_tracked`` are loaded buffers, not trained."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.running_mean = Buffer(jnp.zeros((dim,), jnp.float32))
        self.running_var = Buffer(jnp.ones((dim,), jnp.float32))
        self.num_batches_tracked = Buffer(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.scale[...].astype(jnp.float32)
        y = (x.astype(jnp.float32) - self.running_mean[...]) * inv + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def make_norm(norm_type: str, dim: int, *, dtype=None, param_dtype=jnp.float32):
    """diffusers ``get_normalization(norm_type, dim)`` (eps 1e-5, affine, bias)."""
    if norm_type == "rms_norm":
        return BiasedRMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
    if norm_type == "batch_norm":
        return BatchNorm2d(dim, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"AutoencoderDC: unsupported norm type {norm_type!r}; supported: {', '.join(_NORM_TYPES)}")


class ResBlock(nnx.Module):
    """``x + norm(conv2(act(conv1(x))))`` (3x3 convs, ``conv2`` without bias)."""

    def __init__(self, channels: int, norm_type: str, act_fn: str, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        get_activation(act_fn)
        self.act_fn = act_fn
        self.conv1 = conv2d(channels, channels, 3, **kw)
        self.conv2 = conv2d(channels, channels, 3, use_bias=False, **kw)
        self.norm = make_norm(norm_type, channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.norm(self.conv2(get_activation(self.act_fn)(self.conv1(x))))


class SanaMultiscaleAttentionProjection(nnx.Module):
    """Depthwise ``k x k`` conv then grouped (per head and q/k/v) 1x1 conv, both bias-free."""

    def __init__(self, channels: int, heads: int, kernel: int, **kw):
        self.proj_in = conv2d(channels, channels, kernel, groups=channels, use_bias=False, **kw)
        self.proj_out = conv2d(channels, channels, 1, groups=3 * heads, use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.proj_in(x))


class SanaMultiscaleLinearAttention(nnx.Module):
    """ReLU linear attention over ``H*W`` positions (quadratic ReLU attention when
    ``H*W <= attention_head_dim``) on q/k/v and their multi-scale aggregates; ``to_out``,
    ``norm_out``, residual. Attention arithmetic in float32. ``[B, H, W, C]`` -> same."""

    def __init__(self, channels: int, head_dim: int, norm_type: str, kernel_sizes: tuple[int, ...], *, rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim, self.eps = head_dim, 1e-15
        self.to_q = linear(channels, inner, use_bias=False, **kw)
        self.to_k = linear(channels, inner, use_bias=False, **kw)
        self.to_v = linear(channels, inner, use_bias=False, **kw)
        self.to_qkv_multiscale = nnx.List(
            [SanaMultiscaleAttentionProjection(3 * inner, heads, k, **kw) for k in kernel_sizes]
        )
        self.to_out = linear(inner * (1 + len(kernel_sizes)), channels, use_bias=False, **kw)
        self.norm_out = make_norm(norm_type, channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        d = self.head_dim
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        qkv = jnp.concatenate([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], axis=-1)
        # torch reshapes NCHW channels into heads of 3*d consecutive channels, each split q|k|v.
        qkv = qkv.astype(jnp.float32).reshape(b, h * w, -1, 3 * d)
        q, k, v = jax.nn.relu(qkv[..., :d]), jax.nn.relu(qkv[..., d:2 * d]), qkv[..., 2 * d:]
        if h * w > d:  # linear: (v|1) k^T q, last row normalises
            v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
            kv = jnp.einsum("bngv,bngk->bgvk", v1, k)
            out = jnp.einsum("bgvk,bngk->bngv", kv, q)
            out = out[..., :d] / (out[..., d:] + self.eps)
        else:  # quadratic: scores k^T q normalised over keys
            scores = jnp.einsum("bmgk,bngk->bgmn", k, q)
            scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + self.eps)
            out = jnp.einsum("bmgv,bgmn->bngv", v, scores)
        out = out.reshape(b, h, w, -1).astype(x.dtype)
        return x + self.norm_out(self.to_out(out))


class GLUMBConv(nnx.Module):
    """Sana's gated inverted-bottleneck conv (expand 4, SiLU) with RMSNorm and residual."""

    def __init__(self, channels: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hidden = 4 * channels
        self.conv_inverted = conv2d(channels, 2 * hidden, 1, **kw)
        self.conv_depth = conv2d(2 * hidden, 2 * hidden, 3, groups=2 * hidden, **kw)
        self.conv_point = conv2d(hidden, channels, 1, use_bias=False, **kw)
        self.norm = BiasedRMSNorm(channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        h, gate = jnp.split(h, 2, axis=-1)
        return x + self.norm(self.conv_point(h * jax.nn.silu(gate)))


class EfficientViTBlock(nnx.Module):
    """``attn`` (multi-scale linear attention) then ``conv_out`` (GLUMBConv)."""

    def __init__(self, channels: int, head_dim: int, norm_type: str, kernel_sizes: tuple[int, ...], **kw):
        self.attn = SanaMultiscaleLinearAttention(channels, head_dim, norm_type, tuple(kernel_sizes), **kw)
        self.conv_out = GLUMBConv(channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.attn(x))


class DCDownBlock2d(nnx.Module):
    """Halve H and W: 3x3 conv (stride 2, or stride 1 + pixel unshuffle) plus, with ``shortcut``,
    the pixel-unshuffled input averaged over channel groups."""

    def __init__(self, in_ch: int, out_ch: int, pixel_unshuffle: bool, shortcut: bool, **kw):
        self.pixel_unshuffle, self.shortcut = pixel_unshuffle, shortcut
        self.group_size = in_ch * 4 // out_ch
        if pixel_unshuffle:
            self.conv = conv2d(in_ch, out_ch // 4, 3, **kw)
        else:
            self.conv = conv2d(in_ch, out_ch, 3, stride=2, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        if self.pixel_unshuffle:
            y = pixel_unshuffle(y)
        if self.shortcut:
            y = y + channel_group_mean(pixel_unshuffle(x), self.group_size)
        return y


class DCUpBlock2d(nnx.Module):
    """Double H and W: nearest upsample + 3x3 conv, or 3x3 conv + pixel shuffle; with
    ``shortcut`` plus the input's channels repeated and pixel-shuffled."""

    def __init__(self, in_ch: int, out_ch: int, interpolate: bool, shortcut: bool, **kw):
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = out_ch * 4 // in_ch
        self.conv = conv2d(in_ch, out_ch if interpolate else out_ch * 4, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(upsample_nearest(x)) if self.interpolate else pixel_shuffle(self.conv(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1))
        return y


def _per_stage(value, n: int, name: str) -> tuple:
    values = (value,) * n if isinstance(value, str) else tuple(value)
    if len(values) != n:
        raise ValueError(f"AutoencoderDC: {name} has {len(values)} entries for {n} stages")
    return values


def _stage_block(block_type: str, channels: int, cfg, multiscales, norm_type: str, act_fn: str, **kw):
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn, **kw)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, cfg["attention_head_dim"], norm_type, multiscales, **kw)
    raise ValueError(f"AutoencoderDC: unsupported block type {block_type!r}; supported: {', '.join(_BLOCK_TYPES)}")


class DCEncoder(nnx.Module):
    """diffusers ``autoencoder_dc.Encoder``: ``[B, H, W, in]`` -> ``[B, H/f, W/f, latent]``."""

    def __init__(self, cfg, **kw):
        chans, layers = cfg["encoder_block_out_channels"], cfg["encoder_layers_per_block"]
        n = len(chans)
        types = _per_stage(cfg["encoder_block_types"], n, "encoder_block_types")
        scales = _per_stage(cfg["encoder_qkv_multiscales"], n, "encoder_qkv_multiscales")
        _per_stage(layers, n, "encoder_layers_per_block")
        unshuffle = cfg["downsample_block_type"] == "pixel_unshuffle"
        first = chans[0] if layers[0] > 0 else chans[1]
        if layers[0] > 0:
            self.conv_in = conv2d(cfg["in_channels"], first, 3, **kw)
        else:
            self.conv_in = DCDownBlock2d(cfg["in_channels"], first, unshuffle, shortcut=False, **kw)
        stages = []
        for i, (ch, num) in enumerate(zip(chans, layers)):
            stage = [_stage_block(types[i], ch, cfg, scales[i], "rms_norm", "silu", **kw) for _ in range(num)]
            if i < n - 1 and num > 0:
                stage.append(DCDownBlock2d(ch, chans[i + 1], unshuffle, shortcut=True, **kw))
            stages.append(nnx.List(stage))
        self.down_blocks = nnx.List(stages)
        self.conv_out = conv2d(chans[-1], cfg["latent_channels"], 3, **kw)
        self.out_group = chans[-1] // cfg["latent_channels"] if cfg["encoder_out_shortcut"] else None

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            for block in stage:
                x = call_block(block, remat, x)
        y = self.conv_out(x)
        return y if self.out_group is None else y + channel_group_mean(x, self.out_group)


class DCDecoder(nnx.Module):
    """diffusers ``autoencoder_dc.Decoder``: ``[B, h, w, latent]`` -> ``[B, h*f, w*f, in]``.
    ``up_blocks[i]`` is stage ``i`` (its upsampler first); stages run from last to first."""

    def __init__(self, cfg, **kw):
        chans, layers = cfg["decoder_block_out_channels"], cfg["decoder_layers_per_block"]
        n = len(chans)
        types = _per_stage(cfg["decoder_block_types"], n, "decoder_block_types")
        scales = _per_stage(cfg["decoder_qkv_multiscales"], n, "decoder_qkv_multiscales")
        norms = _per_stage(cfg["decoder_norm_types"], n, "decoder_norm_types")
        acts = _per_stage(cfg["decoder_act_fns"], n, "decoder_act_fns")
        _per_stage(layers, n, "decoder_layers_per_block")
        interpolate = cfg["upsample_block_type"] == "interpolate"
        self.conv_in = conv2d(cfg["latent_channels"], chans[-1], 3, **kw)
        self.in_repeats = chans[-1] // cfg["latent_channels"] if cfg["decoder_in_shortcut"] else None
        stages = []
        for i, (ch, num) in enumerate(zip(chans, layers)):
            stage = []
            if i < n - 1 and num > 0:
                stage.append(DCUpBlock2d(chans[i + 1], ch, interpolate, shortcut=True, **kw))
            stage += [_stage_block(types[i], ch, cfg, scales[i], norms[i], acts[i], **kw) for _ in range(num)]
            stages.append(nnx.List(stage))
        self.up_blocks = nnx.List(stages)
        last = chans[0] if layers[0] > 0 else chans[1]
        self.norm_out = BiasedRMSNorm(last, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        get_activation(cfg["decoder_conv_act_fn"])
        self.conv_act = cfg["decoder_conv_act_fn"]
        if layers[0] > 0:
            self.conv_out = conv2d(last, cfg["in_channels"], 3, **kw)
        else:
            self.conv_out = DCUpBlock2d(last, cfg["in_channels"], interpolate, shortcut=False, **kw)

    def __call__(self, z: jax.Array, remat: bool = False) -> jax.Array:
        x = self.conv_in(z)
        if self.in_repeats is not None:
            x = x + jnp.repeat(z, self.in_repeats, axis=-1)
        for stage in reversed(self.up_blocks):
            for block in stage:
                x = call_block(block, remat, x)
        return self.conv_out(get_activation(self.conv_act)(self.norm_out(x)))


class AutoencoderDC(nnx.Module):
    """diffusers ``AutoencoderDC``: ``encoder`` and ``decoder``.

    - ``encode(x)``: images NCHW ``[B, in_channels, H, W]`` -> latents NCHW
      ``[B, latent_channels, H/f, W/f]`` (deterministic, as ``vae.encode(x).latent``).
    - ``decode(z)``: raw latents NCHW -> images NCHW, as ``vae.decode(z).sample``.
    - ``decode_latents`` / ``encode_latents``: diffusion latents <-> images with the Sana
      pipeline's ``z = latents / scaling_factor``.

    Attributes as ``AutoencoderKL``: ``config``, ``latent_channels``, ``scaling_factor``,
    ``shift_factor`` (always 0.0: DC-AE has none), ``spatial_compression_ratio``.
    """

    def __init__(self, config: dict[str, Any] | None = None, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, remat: bool = False):
        cfg = merge_config(AUTOENCODER_DC_DEFAULTS, config, "AutoencoderDC")
        for key, allowed in (("upsample_block_type", ("pixel_shuffle", "interpolate")),
                             ("downsample_block_type", ("pixel_unshuffle", "conv", "Conv"))):
            if cfg[key] not in allowed:
                raise ValueError(f"AutoencoderDC: unsupported {key} {cfg[key]!r}; supported: {', '.join(allowed)}")
        self.config = cfg
        self.remat = remat
        self.latent_channels = int(cfg["latent_channels"])
        self.scaling_factor = float(cfg["scaling_factor"])
        self.shift_factor = 0.0
        self.spatial_compression_ratio = 2 ** (len(cfg["encoder_block_out_channels"]) - 1)
        kw = dict(rngs=KeySequence(rngs), dtype=dtype, param_dtype=param_dtype)
        self.encoder = DCEncoder(cfg, **kw)
        self.decoder = DCDecoder(cfg, **kw)

    def encode(self, x: jax.Array) -> jax.Array:
        """Images NCHW ``[B, in_channels, H, W]`` (H, W multiples of ``f``) -> latents NCHW."""
        return nhwc_to_nchw(self.encoder(nchw_to_nhwc(x), self.remat))

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents NCHW ``[B, latent_channels, h, w]`` -> images NCHW ``[B, in_channels, h*f, w*f]``."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"AutoencoderDC.decode expects NCHW latents [B, {self.latent_channels}, h, w], "
                             f"got shape {tuple(z.shape)}")
        return nhwc_to_nchw(self.decoder(nchw_to_nhwc(z), self.remat))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction ``decode(encode(x))`` (diffusers' ``forward``)."""
        return self.decode(self.encode(x))

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents -> raw latents, as the Sana pipeline: ``latents / scaling_factor``."""
        return latents / self.scaling_factor

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Raw latents -> diffusion-space latents ``z * scaling_factor``."""
        return z * self.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents NCHW -> images NCHW: ``decode(latents / scaling_factor)``."""
        return self.decode(self.unscale_latents(latents))

    def encode_latents(self, x: jax.Array) -> jax.Array:
        """Images NCHW in [-1, 1] -> diffusion-space latents ``encode(x) * scaling_factor``."""
        return self.scale_latents(self.encode(x))
