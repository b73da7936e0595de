"""VAE ports (AutoencoderKL, AutoencoderDC) against diffusers on the same random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")

from fraqat_jax.models import (  # noqa: E402
    AutoencoderDC, AutoencoderKL, count_params, from_diffusers, load_state_dict, load_vae,
)
from fraqat_jax.models.autoencoder_dc import DC_PRESETS  # noqa: E402
from fraqat_jax.models.autoencoder_kl import KL_PRESETS  # noqa: E402
from fraqat_jax.models.vae import NotAVAEError, images_to_uint8  # noqa: E402
from parity_utils import assert_close, randomize  # noqa: E402

_KL_TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32)
# PixArt-Sigma / SDXL-like: 4 channels, quant convs, no shift.
KL_4 = dict(_KL_TINY, latent_channels=4, scaling_factor=0.13025)
# SD3 / FLUX-like: 16 channels, shift, no quant convs.
KL_16 = dict(_KL_TINY, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False)
# Per-channel latents_mean/std (the pipelines' other normalisation), mid-block without attention.
KL_STATS = dict(_KL_TINY, latent_channels=4, scaling_factor=0.5, mid_block_add_attention=False,
                latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))

# diffusers' own AutoencoderDC test config: conv down, interpolate up, linear attention.
DC_DIFFUSERS_TEST = dict(
    in_channels=3, latent_channels=4, attention_head_dim=2,
    encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
    encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)
# The other branches: pixel (un)shuffle, empty first stage (conv_in/conv_out are DC blocks),
# batch norm + ReLU stages, two multiscale kernels, and quadratic attention (H*W <= head dim).
DC_SHUFFLE = dict(
    in_channels=3, latent_channels=8, attention_head_dim=8,
    encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
    encoder_qkv_multiscales=((), (3,), (5, 3)), decoder_qkv_multiscales=((), (), (5,)),
    encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 1, 1),
    downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
    decoder_norm_types=("batch_norm", "batch_norm", "batch_norm"), decoder_act_fns=("relu", "relu", "silu"),
    scaling_factor=0.5,
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales and biases included) and BatchNorm statistics off
    their defaults, so a parameter loaded into the wrong place shows up."""
    gen = randomize(module, seed)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)


def _saved(cls_name, config, seed, path):
    ref = getattr(diffusers, cls_name)(**config).eval()
    _randomize(ref, seed)
    ref.save_pretrained(path)
    return ref


def _abstract(cls, config):
    """Shapes only: eager random init compiles one XLA program per parameter shape (slow)."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


@nnx.jit
def _encode_decode(model, x, z):
    """``(encode(x), decode(z))`` in one program: one XLA compile per test instead of two."""
    return model.encode(x), model.decode(z)


@nnx.jit
def _kl_forward(model, x, latents):
    """AutoencoderKL: the posterior with its KL and a reparameterised sample, and
    ``decode_latents(latents)`` (= ``decode(unscale_latents(latents))``), compiled together."""
    dist = model.encode(x)
    return dist, dist.kl(), dist.sample(jax.random.key(0)), model.decode_latents(latents)


@pytest.mark.parametrize("config", [KL_4, KL_16], ids=["4ch", "16ch-shift"])
def test_autoencoder_kl_parity(config, tmp_path):
    ref = _saved("AutoencoderKL", config, 0, tmp_path)
    model = from_diffusers(tmp_path)
    assert isinstance(model, AutoencoderKL)
    assert model.latent_channels == config["latent_channels"] and model.spatial_compression_ratio == 2
    assert model.scaling_factor == config["scaling_factor"]
    assert model.shift_factor == config.get("shift_factor", 0.0)

    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    # decode through the pipelines' path from diffusion-space latents (SD3/FLUX shift, PixArt not)
    latents = np.random.default_rng(2).standard_normal((2, config["latent_channels"], 8, 12)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
        ref_pixels = ref.decode(torch.from_numpy(latents) / ref.config.scaling_factor
                                + (ref.config.shift_factor or 0.0)).sample
    mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    dist, kl, draw, pixels = _kl_forward(model, jnp.asarray(x), jnp.asarray(latents))
    assert_close(dist.mean, mean)
    assert_close(dist.logvar, logvar)
    assert pixels.shape == (2, 3, 16, 24)
    assert_close(pixels, ref_pixels.numpy())

    # the posterior as a distribution: KL to N(0, I) and reparameterised samples
    ref_kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(kl), ref_kl, rtol=1e-4)
    eps = (np.asarray(draw) - np.asarray(dist.mean)) / np.exp(0.5 * np.asarray(dist.logvar))
    assert eps.shape == mean.shape and 0.5 < float(np.std(eps)) < 1.5
    # uint8 images as diffusers' image processor makes them
    pil = diffusers.image_processor.VaeImageProcessor().postprocess(ref_pixels, output_type="pil")
    np.testing.assert_array_equal(np.asarray(images_to_uint8(jnp.asarray(ref_pixels.numpy())))[0], np.asarray(pil[0]))


@pytest.mark.parametrize("cls,config", [(AutoencoderKL, KL_4), (AutoencoderKL, KL_16), (AutoencoderKL, KL_STATS),
                                        (AutoencoderDC, DC_DIFFUSERS_TEST)], ids=["4ch", "shift", "stats", "dc"])
def test_latent_scaling_matches_the_pipelines(cls, config):
    """unscale_latents is what the pipelines apply before vae.decode (SD3/FLUX: shift; PixArt,
    Sana: scale only; SDXL-style configs: per-channel mean/std); scale_latents inverts it."""
    model = _abstract(cls, config)
    latents = np.random.default_rng(3).standard_normal((2, config["latent_channels"], 3, 5)).astype(np.float32)
    if config.get("latents_mean") is not None:
        mean = np.asarray(config["latents_mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(config["latents_std"], np.float32).reshape(1, -1, 1, 1)
        expected = latents * std / config["scaling_factor"] + mean
    else:
        expected = latents / config["scaling_factor"] + config.get("shift_factor", 0.0)
    raw = model.unscale_latents(jnp.asarray(latents))
    np.testing.assert_allclose(np.asarray(raw), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.scale_latents(raw)), latents, rtol=1e-5, atol=1e-5)


def test_mid_block_without_attention_loads_strictly():
    """The loader is strict, so equal key sets and shapes prove the structure (no compile needed)."""
    ref = diffusers.AutoencoderKL(**KL_STATS)
    model = load_state_dict(_abstract(AutoencoderKL, KL_STATS), {k: v.numpy() for k, v in ref.state_dict().items()})
    assert len(model.decoder.mid_block.attentions) == 0


@pytest.mark.parametrize("config,shape", [(DC_DIFFUSERS_TEST, (2, 3, 16, 24)), (DC_SHUFFLE, (2, 3, 8, 16))],
                         ids=["diffusers-test", "shuffle-batchnorm-quadratic"])
def test_autoencoder_dc_parity(config, shape, tmp_path):
    ref = _saved("AutoencoderDC", config, 4, tmp_path)
    model = from_diffusers(tmp_path)
    assert isinstance(model, AutoencoderDC)
    assert model.scaling_factor == config["scaling_factor"] and model.shift_factor == 0.0
    x = np.random.default_rng(5).uniform(-1, 1, shape).astype(np.float32)
    with torch.no_grad():
        z = ref.encode(torch.from_numpy(x)).latent
        ref_image = ref.decode(z).sample.numpy()
    latents, image = _encode_decode(model, jnp.asarray(x), jnp.asarray(z.numpy()))
    f = model.spatial_compression_ratio
    assert latents.shape == (shape[0], config["latent_channels"], shape[2] // f, shape[3] // f)
    assert_close(latents, z.numpy())
    assert_close(image, ref_image)


def test_load_vae_takes_pipeline_folders_and_refuses_other_families(tmp_path):
    pipeline = tmp_path / "pipeline"
    _saved("AutoencoderKL", KL_16, 6, pipeline / "vae")
    diffusers.DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=4, num_layers=1,
                                    sample_size=4, patch_size=2, norm_num_groups=1).save_pretrained(
        pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))

    assert isinstance(load_vae(pipeline), AutoencoderKL)
    assert isinstance(load_vae(pipeline / "vae"), AutoencoderKL)
    with pytest.raises(NotAVAEError, match="DiTTransformer2DModel") as info:
        load_vae(pipeline / "transformer")
    assert "AutoencoderKL" in str(info.value) and "AutoencoderDC" in str(info.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)


def test_unsupported_configs_name_the_value():
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        _abstract(AutoencoderKL, dict(KL_4, down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D")))
    with pytest.raises(ValueError, match="layer_norm"):
        _abstract(AutoencoderDC, dict(DC_DIFFUSERS_TEST, decoder_norm_types="layer_norm"))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        _abstract(AutoencoderKL, KL_4).decode(jnp.zeros((1, 16, 2, 2)))


@pytest.mark.parametrize("cls,name", [(AutoencoderKL, "SD3-VAE"), (AutoencoderKL, "SDXL-VAE"),
                                      (AutoencoderDC, "DC-AE-f32c32-Sana-1.0")])
def test_published_sizes_match_diffusers(cls, name):
    config = {**KL_PRESETS, **DC_PRESETS}[name]
    with torch.device("meta"):
        ref = getattr(diffusers, cls.__name__)(**config)
    ours = count_params(_abstract(cls, config))
    assert ours == sum(p.numel() for p in ref.parameters())
