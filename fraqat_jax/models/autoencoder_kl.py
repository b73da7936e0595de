"""The KL VAE of latent diffusion as diffusers' ``AutoencoderKL``, in Flax NNX.

Used by SD3/SD3.5 and FLUX.1 (16 latent channels, ``shift_factor`` set, no (post-)quant conv)
and PixArt-Sigma (the SDXL VAE: 4 latent channels, no shift). ``models.vae.load_vae`` loads it
(or ``AutoencoderDC``) from a diffusers folder and refuses other model families.

Layout: ``encode``/``decode`` take and return NCHW arrays like diffusers (images ``[B, 3, H, W]``
in [-1, 1], latents ``[B, C, H/f, W/f]`` with ``f = 2 ** (len(block_out_channels) - 1)``, the
layout the transformer ports take); inside, everything runs channels-last (NHWC, XLA's native
convolution layout), so each call transposes once at entry and once at exit.

Parameter paths equal diffusers' state-dict keys (``weight`` -> ``kernel``/``scale``), so the
generic loader of ``models.convert`` fills them. Random init follows torch's defaults.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fraqat_jax.models.activations import get_activation
from fraqat_jax.models.common import (
    KeySequence,
    call_block,
    linear,
    merge_config,
    torch_bias_init,
    torch_kernel_init,
)

AUTOENCODER_KL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_KL_COMMON = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
}

# Published VAE configs (the diffusers ``vae/config.json`` of each pipeline), for shapes and tests.
# Kept out of ``models.PRESETS``, which lists transformers (teacher presets).
KL_PRESETS: dict[str, dict[str, Any]] = {
    "SD3-VAE": {**_KL_COMMON, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "use_quant_conv": False, "use_post_quant_conv": False},
    "FLUX.1-VAE": {**_KL_COMMON, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                   "use_quant_conv": False, "use_post_quant_conv": False},
    "SDXL-VAE": {**_KL_COMMON, "latent_channels": 4, "scaling_factor": 0.13025},  # PixArt-Sigma's VAE
}


# ----------------------------------------------------------------------------------------------
# Building blocks (NHWC inside), shared with autoencoder_dc
# ----------------------------------------------------------------------------------------------


def conv2d(in_channels: int, out_channels: int, kernel: int, *, rngs, stride: int = 1, padding: int | None = None,
           groups: int = 1, use_bias: bool = True, dtype=None, param_dtype=jnp.float32) -> nnx.Conv:
    """``nnx.Conv`` mirroring ``torch.nn.Conv2d(in, out, kernel, stride, padding, groups=...)``:
    symmetric explicit padding (``kernel // 2`` by default), kernel ``[k, k, in/groups, out]``,
    torch's default init."""
    pad = kernel // 2 if padding is None else padding
    fan_in = in_channels // groups * kernel * kernel
    return nnx.Conv(
        in_channels, out_channels, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in), rngs=rngs,
    )


def group_norm(channels: int, groups: int, eps: float, *, rngs, dtype=None, param_dtype=jnp.float32) -> nnx.GroupNorm:
    """``torch.nn.GroupNorm(groups, channels, eps)`` over NHWC: statistics per sample and group."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into norm_num_groups={groups} groups")
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """``F.interpolate(scale_factor=factor, mode="nearest")`` on NHWC ``[B, H, W, C]``."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D NCHW array [B, C, H, W], got shape {tuple(x.shape)}")
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: ``norm1, act, conv1, norm2, act,
    conv2`` plus the input (through the 1x1 ``conv_shortcut`` when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, act_fn: str, *, rngs, dtype=None,
                 param_dtype=jnp.float32, eps: float = 1e-6):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act_fn = act_fn
        self.norm1 = group_norm(in_ch, groups, eps, **kw)
        self.conv1 = conv2d(in_ch, out_ch, 3, **kw)
        self.norm2 = group_norm(out_ch, groups, eps, **kw)
        self.conv2 = conv2d(out_ch, out_ch, 3, **kw)
        self.conv_shortcut = conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class VAEAttention(nnx.Module):
    """diffusers ``Attention`` as the VAE mid-block builds it (``_from_deprecated_attn_block``):
    GroupNorm, one head over all ``C`` channels of the ``H*W`` positions, softmax in float32,
    ``to_out.0``, residual. ``[B, H, W, C]`` -> same."""

    def __init__(self, channels: int, groups: int, *, rngs, dtype=None, param_dtype=jnp.float32, eps: float = 1e-6):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = group_norm(channels, groups, eps, **kw)
        self.to_q = linear(channels, channels, **kw)
        self.to_k = linear(channels, channels, **kw)
        self.to_v = linear(channels, channels, **kw)
        self.to_out = nnx.List([linear(channels, channels, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class Downsample2D(nnx.Module):
    """Encoder downsampler: pad one zero row/column at the bottom/right, 3x3 conv stride 2."""

    def __init__(self, channels: int, **kw):
        self.conv = conv2d(channels, channels, 3, stride=2, padding=0, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """Decoder upsampler: nearest 2x, 3x3 conv."""

    def __init__(self, channels: int, **kw):
        self.conv = conv2d(channels, channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x))


class UNetMidBlock2D(nnx.Module):
    """``resnets.0``, then (``attentions.i`` if attention is on, ``resnets.i+1``)."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool, **kw):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, act_fn, **kw) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(channels, groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        x = call_block(self.resnets[0], remat, x)
        if len(self.attentions):
            x = call_block(self.attentions[0], remat, x)
        return call_block(self.resnets[1], remat, x)


class SampleBlock(nnx.Module):
    """``DownEncoderBlock2D`` (``downsamplers``) or ``UpDecoderBlock2D`` (``upsamplers``):
    ``resnets`` then the optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, act_fn: str, resample: str | None,
                 **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, act_fn, **kw) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(out_ch, **kw)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if resample == "up" else None

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        for resnet in self.resnets:
            x = call_block(resnet, remat, x)
        for resampler in (self.downsamplers or self.upsamplers or ()):
            x = resampler(x)
        return x


class Encoder(nnx.Module):
    """diffusers ``vae.Encoder`` (``double_z``): ``[B, H, W, in]`` -> ``[B, H/f, W/f, 2*latent]``."""

    def __init__(self, cfg, **kw):
        chans, groups, act = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        self.conv_in = conv2d(cfg["in_channels"], chans[0], 3, **kw)
        self.down_blocks = nnx.List([
            SampleBlock(chans[max(i - 1, 0)], ch, cfg["layers_per_block"], groups, act,
                        "down" if i < len(chans) - 1 else None, **kw)
            for i, ch in enumerate(chans)
        ])
        self.mid_block = UNetMidBlock2D(chans[-1], groups, act, cfg["mid_block_add_attention"], **kw)
        self.conv_norm_out = group_norm(chans[-1], groups, 1e-6, **kw)
        self.conv_out = conv2d(chans[-1], 2 * cfg["latent_channels"], 3, **kw)
        self.act_fn = act

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x, remat)
        x = self.mid_block(x, remat)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers ``vae.Decoder`` (group norm): ``[B, h, w, latent]`` -> ``[B, h*f, w*f, out]``."""

    def __init__(self, cfg, **kw):
        chans, groups, act = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        rev = list(reversed(chans))
        self.conv_in = conv2d(cfg["latent_channels"], rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], groups, act, cfg["mid_block_add_attention"], **kw)
        self.up_blocks = nnx.List([
            SampleBlock(rev[max(i - 1, 0)], ch, cfg["layers_per_block"] + 1, groups, act,
                        "up" if i < len(chans) - 1 else None, **kw)
            for i, ch in enumerate(rev)
        ])
        self.conv_norm_out = group_norm(chans[0], groups, 1e-6, **kw)
        self.conv_out = conv2d(chans[0], cfg["out_channels"], 3, **kw)
        self.act_fn = act

    def __call__(self, z: jax.Array, remat: bool = False) -> jax.Array:
        x = self.mid_block(self.conv_in(z), remat)
        for block in self.up_blocks:
            x = block(x, remat)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class LatentDistribution(NamedTuple):
    """diffusers ``DiagonalGaussianDistribution`` of ``encode``: ``mean`` and ``logvar`` (clamped
    to [-30, 20]), both NCHW ``[B, latent_channels, H/f, W/f]``. A pytree, so it leaves ``jit``."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps``, ``eps ~ N(0, 1)`` drawn from ``key``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """KL divergence to N(0, I), summed over C, H, W: ``[B]``."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _check_kl_config(cfg) -> None:
    bad = [t for t in cfg["down_block_types"] if t != "DownEncoderBlock2D"]
    bad += [t for t in cfg["up_block_types"] if t != "UpDecoderBlock2D"]
    if bad:
        raise ValueError(f"AutoencoderKL: unsupported block types {bad}; supported: DownEncoderBlock2D "
                         "(down_block_types) and UpDecoderBlock2D (up_block_types)")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(f"AutoencoderKL: {len(cfg['down_block_types'])} down and {len(cfg['up_block_types'])} up "
                         f"block types for {n} block_out_channels; they must be equal")
    get_activation(cfg["act_fn"])


def scaled_latent_stats(cfg, channels: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``(mean, std)`` broadcastable to NCHW latents: the config's per-channel ``latents_mean`` /
    ``latents_std`` if given, else ``shift_factor`` (0 if None) and 1."""
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        mean = jnp.asarray(cfg["latents_mean"], dtype).reshape(1, channels, 1, 1)
        std = jnp.asarray(cfg["latents_std"], dtype).reshape(1, channels, 1, 1)
        return mean, std
    return jnp.asarray(cfg.get("shift_factor") or 0.0, dtype), jnp.asarray(1.0, dtype)


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL``: ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``.

    - ``encode(x)``: images NCHW ``[B, in_channels, H, W]`` -> ``LatentDistribution`` (NCHW
      ``[B, latent_channels, H/f, W/f]``), as ``vae.encode(x).latent_dist``.
    - ``decode(z)``: raw latents NCHW -> images NCHW, as ``vae.decode(z).sample``.
    - ``decode_latents(latents)`` / ``encode_latents(x)``: diffusion latents <-> images, with the
      pipelines' ``z = latents / scaling_factor + shift_factor`` (``unscale_latents``; per-channel
      ``latents_std``/``latents_mean`` instead when the config has them) and its inverse
      (``scale_latents``).

    Attributes: ``config`` (merged diffusers config), ``latent_channels``, ``scaling_factor``,
    ``shift_factor`` (0.0 when the config's is None), ``spatial_compression_ratio`` (``f``).
    ``dtype``: compute dtype (None: follow inputs/params); group-norm statistics and the attention
    softmax run in float32. ``remat`` recomputes each resnet/attention block in the backward pass.
    """

    def __init__(self, config: dict[str, Any] | None = None, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, remat: bool = False):
        cfg = merge_config(AUTOENCODER_KL_DEFAULTS, config, "AutoencoderKL")
        _check_kl_config(cfg)
        self.config = cfg
        self.remat = remat
        self.latent_channels = int(cfg["latent_channels"])
        self.scaling_factor = float(cfg["scaling_factor"])
        self.shift_factor = float(cfg["shift_factor"] or 0.0)
        self.spatial_compression_ratio = 2 ** (len(cfg["block_out_channels"]) - 1)
        kw = dict(rngs=KeySequence(rngs), dtype=dtype, param_dtype=param_dtype)
        latent = self.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = conv2d(2 * latent, 2 * latent, 1, **kw) if cfg["use_quant_conv"] else None
        self.post_quant_conv = conv2d(latent, latent, 1, **kw) if cfg["use_post_quant_conv"] else None

    def encode(self, x: jax.Array) -> LatentDistribution:
        """Images NCHW ``[B, in_channels, H, W]`` (H, W multiples of ``f``) -> the posterior."""
        h = self.encoder(nchw_to_nhwc(x), self.remat)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(nhwc_to_nchw(h), 2, axis=1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw (unscaled) latents NCHW ``[B, latent_channels, h, w]`` -> images NCHW
        ``[B, out_channels, h*f, w*f]`` (nominally in [-1, 1], not clipped)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode expects NCHW latents [B, {self.latent_channels}, h, w], "
                             f"got shape {tuple(z.shape)}")
        h = nchw_to_nhwc(z)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return nhwc_to_nchw(self.decoder(h, self.remat))

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction as diffusers' ``forward``: decode the posterior's mode, or a sample when
        ``key`` is given."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents NCHW -> the VAE's raw latents, as the pipelines do before
        ``vae.decode``: ``latents / scaling_factor + shift_factor`` (with the config's per-channel
        ``latents_std``/``latents_mean`` in place of 1 and ``shift_factor`` when it has them)."""
        mean, std = scaled_latent_stats(self.config, self.latent_channels, latents.dtype)
        return latents * std / self.scaling_factor + mean

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of ``unscale_latents``: raw latents -> ``(z - shift_factor) * scaling_factor``."""
        mean, std = scaled_latent_stats(self.config, self.latent_channels, z.dtype)
        return (z - mean) * self.scaling_factor / std

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion-space latents NCHW (what the transformer samples) -> images NCHW in about
        [-1, 1]: ``decode(unscale_latents(latents))``."""
        return self.decode(self.unscale_latents(latents))

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images NCHW in [-1, 1] -> diffusion-space latents ``scale_latents(z)``, ``z`` the
        posterior's mode (or a sample when ``key`` is given), as the training scripts do."""
        posterior = self.encode(x)
        return self.scale_latents(posterior.mode() if key is None else posterior.sample(key))
