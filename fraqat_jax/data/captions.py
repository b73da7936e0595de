"""Captioned digits for the text-to-image teacher: captions, prompt encoding in JAX, the data source.

A text-to-image pipeline folder in diffusers' ``SanaPipeline`` layout (``tokenizer/``,
``text_encoder/``, ``vae/``, ``transformer/``, ``scheduler/``) plus our ``fraqat.json`` holds
everything a prompt needs on its way to the transformer:

- :class:`PromptEncoder`: the prompt as ``SanaPipeline._get_gemma_prompt_embeds`` encodes it without
  the complex human instruction: lower-cased and stripped, tokenized (``<bos>`` first) and padded on
  the right to ``max_sequence_length`` tokens, run through the ``Gemma2Model`` text encoder; returns
  its last hidden states after the final norm ``[B, L, D]`` and the attention mask ``[B, L]``. The
  unconditional (classifier-free guidance) input is the empty prompt ``""`` encoded the same way,
  the pipeline's default negative prompt.
- :func:`digit_images`: the shipped 8x8 UCI digits enlarged by pixel repetition to the pipeline's
  image size, in [-1, 1] (averaging each box of pixels gives the 8x8 digit back exactly).
- :func:`captioned_digits`: a :class:`~fraqat_jax.data.sources.Source` of ``latents`` (the digits
  through the folder's DC-AE, scaled by its ``scaling_factor``), ``encoder_hidden_states`` and
  ``encoder_attention_mask`` of a caption naming the digit, drawn from the training templates, with
  a fraction ``caption_dropout`` of the rows given the empty caption instead.

Templates are strings with ``{word}`` (``seven``) or ``{numeral}`` (``7``); ``fraqat.json`` lists
the training templates and the held-out ones (never trained on, for evaluation).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fraqat_jax.data.sources import DataSourceError, Source, digits

__all__ = ["DIGIT_WORDS", "EXTRAS_FILE", "PromptEncoder", "caption", "captioned_digits", "digit_images",
           "load_text_encoder", "prompt_digit", "read_extras"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EXTRAS_FILE = "fraqat.json"
_DIGIT = re.compile(r"(?<![0-9a-z])(" + "|".join(DIGIT_WORDS) + r"|[0-9])(?![0-9a-z])")


def caption(template: str, digit: int) -> str:
    """``template`` with ``{word}`` / ``{numeral}`` filled in for ``digit`` (0..9)."""
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt names (its first digit word ``zero`` .. ``nine`` or numeral ``0`` .. ``9``,
    case-insensitive, as a whole word), or None when it names none."""
    match = _DIGIT.search(prompt.lower())
    if match is None:
        return None
    token = match.group(1)
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token)


def read_extras(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``fraqat.json`` (templates, text length, image size, null caption)."""
    path = Path(folder) / EXTRAS_FILE
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no {EXTRAS_FILE}: not a captioned-digits pipeline folder") from None


def digit_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 1, S, S] float32 in [-1, 1], labels [N] int32)``: the shipped digits enlarged to
    ``image_size`` (a multiple of 8) by repeating each pixel."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    source = digits()
    factor = image_size // 8
    images = np.repeat(np.repeat(source.arrays["latents"], factor, axis=2), factor, axis=3)
    return np.ascontiguousarray(images, np.float32), source.arrays["class_labels"]


def load_text_encoder(folder: str | os.PathLike, *, dtype=None, param_dtype=None):
    """The ``Gemma2Model`` port of a transformers ``Gemma2Model`` folder (keys without ``model.``)."""
    import jax.numpy as jnp
    from flax import nnx

    from fraqat_jax.models.convert import load_checkpoint, load_state_dict, read_config
    from fraqat_jax.models.gemma2 import Gemma2ForCausalLM

    config = read_config(folder)
    abstract = nnx.eval_shape(lambda: Gemma2ForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                        param_dtype=param_dtype or jnp.float32))
    if abstract.lm_head is not None:
        raise ValueError(f"{folder}: a text encoder must tie its embeddings (tie_word_embeddings), "
                         "it has no LM head to load")
    with load_checkpoint(folder) as tensors:
        # a Gemma2Model is the causal LM's ``model``: load it there, then take it out
        return load_state_dict(abstract, {f"model.{k}": tensors[k] for k in tensors}, source=str(folder)).model


class PromptEncoder:
    """Prompts -> ``(encoder_hidden_states [B, L, D] float32, encoder_attention_mask [B, L] int32)``
    with the tokenizer and text encoder of a pipeline folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, max_sequence_length: int | None = None):
        import jax
        from tokenizers import Tokenizer

        folder = Path(folder)
        extras = read_extras(folder)
        self.max_sequence_length = int(max_sequence_length or extras["max_sequence_length"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))
        pad = self.tokenizer.token_to_id("<pad>")
        if pad is None:
            raise ValueError(f"{folder / 'tokenizer'}: the tokenizer has no <pad> token")
        self.tokenizer.enable_truncation(self.max_sequence_length)
        self.tokenizer.enable_padding(direction="right", pad_id=pad, pad_token="<pad>", length=self.max_sequence_length)
        self.model = load_text_encoder(folder / "text_encoder")
        self._encode = jax.jit(lambda model, ids, mask: model(ids, mask))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids [B, L] int32, attention_mask [B, L] int32)`` of the lower-cased, stripped prompts."""
        encodings = self.tokenizer.encode_batch([p.lower().strip() for p in prompts])
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(prompts), self.max_sequence_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
        return ids, mask

    def __call__(self, prompts: Sequence[str], *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenize(list(prompts))
        out = [np.asarray(self._encode(self.model, ids[i:i + batch_size], mask[i:i + batch_size]), np.float32)
               for i in range(0, len(ids), batch_size)]
        hidden = np.concatenate(out) if out else np.zeros((0, self.max_sequence_length, 0), np.float32)
        return hidden, mask


class _CaptionedDigits(Source):
    """Row ``r``: image ``r % N`` with training template ``r // N`` (or the empty caption for the
    rows ``null`` marks); caption embeddings are gathered from a table of the distinct captions."""

    def __init__(self, latents, labels, table, table_mask, null_row, num_templates, null, seed):
        self.latents, self.labels = latents, labels
        self.table, self.table_mask, self.null_row = table, table_mask, null_row
        self.num_templates, self.null = num_templates, null
        self.seed = int(seed)
        self.num_examples = len(latents) * num_templates
        self.element_spec = {"latents": (latents.shape[1:], np.dtype(np.float32)),
                             "encoder_hidden_states": (table.shape[1:], np.dtype(np.float32)),
                             "encoder_attention_mask": (table_mask.shape[1:], np.dtype(np.int32))}

    def _gather(self, indices):
        image, template = indices % len(self.latents), indices // len(self.latents)
        row = np.where(self.null[indices], self.null_row, self.labels[image] * self.num_templates + template)
        return {"latents": self.latents[image], "encoder_hidden_states": self.table[row],
                "encoder_attention_mask": self.table_mask[row]}


def captioned_digits(folder: str | os.PathLike, *, seed: int = 0, caption_dropout: float | None = None,
                     vae=None, encoder: PromptEncoder | None = None) -> Source:
    """The captioned-digits source of a pipeline folder (see the module docstring); ``vae`` /
    ``encoder``: already loaded parts of the folder (default: loaded from it)."""
    import jax

    from fraqat_jax.models.registry import from_diffusers

    folder = Path(folder)
    try:
        extras = read_extras(folder)
    except FileNotFoundError as e:
        raise DataSourceError("captions", f"cannot be read: {e}") from None
    dropout = float(extras.get("caption_dropout", 0.0) if caption_dropout is None else caption_dropout)
    vae = vae if vae is not None else from_diffusers(folder / "vae")
    encoder = encoder or PromptEncoder(folder)
    images, labels = digit_images(int(extras["image_size"]))
    encode = jax.jit(lambda m, x: m.encode_latents(x))
    latents = np.concatenate([np.asarray(encode(vae, images[i:i + 256])) for i in range(0, len(images), 256)])
    templates = list(extras["templates"]["train"])
    captions = [caption(t, d) for d in range(10) for t in templates] + [extras.get("null_caption", "")]
    table, mask = encoder(captions)
    rng = np.random.default_rng([int(seed), 0xCA97])
    null = rng.random(len(images) * len(templates)) < dropout
    return _CaptionedDigits(latents.astype(np.float32), labels, table, mask, len(captions) - 1, len(templates),
                            null, seed)
