"""Tiny random diffusers text-to-image pipelines, built offline (nothing downloaded) and saved with
``save_pretrained``: the transformer, the VAE, CLIP/T5 text encoders from small ``transformers``
configs and tokenizers built in code (a character-level CLIP BPE vocabulary with no merges, a
character-level T5 unigram vocabulary).

Used by ``tests/eval/test_t2i.py``.
"""

from __future__ import annotations

import json
import os
import string

import numpy as np

T5_WIDTH = 32  # the T5 encoder's d_model: SD3's joint_attention_dim and PixArt's caption_channels
CLIP_WIDTHS = (8, 16)  # CLIP-L / CLIP-G stand-ins; SD3 pads their concatenation to T5_WIDTH
CLIP_PROJ = 8  # each CLIP's text projection; SD3's pooled_projection_dim is twice this
MAX_SEQUENCE_LENGTH = 8  # T5 tokens of the tiny pipelines (SD3: 77 CLIP tokens come before them)
LATENT_SIZE = 8  # latents 8x8; the two-level VAEs (factor 2) make 16x16 images
IMAGE_SIZE = 16
PROMPTS = ["a red cat", "a blue dog on a hill", "green trees"]
CAPTIONS = ["a small house", "the sea at night", "a cat and a dog", "yellow flowers"]


def _tokenizers():
    from transformers import CLIPTokenizer, T5Tokenizer

    letters = string.ascii_lowercase
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) for c in letters})
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in letters] + [("\u2581" + c, -3.5) for c in letters]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, len(vocab), t5, len(pieces)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _clip(vocab_size: int, width: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_PROJ, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=latent_channels, **kw)


def save_vae(path: str, latent_channels: int) -> str:
    """A tiny AutoencoderKL alone (diffusers' ``vae/`` folder layout) saved at ``path``."""
    _vae(latent_channels, scaling_factor=0.5).save_pretrained(path)
    return path


def build_sd3_pipeline(path: str, seed: int = 0) -> str:
    """A tiny StableDiffusion3Pipeline (16-channel VAE with shift, two CLIPs and a T5) saved at ``path``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip_tok, clip_vocab, t5_tok, t5_vocab = _tokenizers()
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_PROJ, pos_embed_max_size=LATENT_SIZE)
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip(clip_vocab, CLIP_WIDTHS[0]), tokenizer=clip_tok,
        text_encoder_2=_clip(clip_vocab, CLIP_WIDTHS[1]), tokenizer_2=clip_tok,
        text_encoder_3=_t5(t5_vocab), tokenizer_3=t5_tok)
    pipe.save_pretrained(path)
    return path


def build_pixart_pipeline(path: str, seed: int = 0) -> str:
    """A tiny PixArtSigmaPipeline (4-channel VAE with quant convs, a T5, learned-sigma transformer)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    _, _, t5_tok, t5_vocab = _tokenizers()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=T5_WIDTH, sample_size=LATENT_SIZE, patch_size=2,
        use_additional_conditions=False, norm_type="ada_norm_single")
    pipe = PixArtSigmaPipeline(tokenizer=t5_tok, text_encoder=_t5(t5_vocab), vae=_vae(4, scaling_factor=0.13025),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(path)
    return path


def write_images(folder: str, captions=CAPTIONS, seed: int = 0) -> str:
    """Random RGB images (``IMAGE_SIZE`` wide, 2 px taller so the centre crop matters) and a
    ``captions.jsonl`` naming them; returns the captions file."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, caption in enumerate(captions):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE + 2, IMAGE_SIZE, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        rows.append({"file": name, "caption": caption})
    path = os.path.join(folder, "captions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_prompts_file(path: str, prompts=PROMPTS) -> str:
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n\n")  # a blank line at the end is skipped
    return path
