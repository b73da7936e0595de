"""Text data: token windows from text files or a prepared TFDS text dataset.

Sources (``spec`` as the ``data`` config key writes it):

- ``text:PATH``: a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, in its
  ``text`` field) or a folder holding such files (searched recursively, read in sorted path order).
  Every document is tokenized with the teacher's ``tokenizer.json`` (the ``tokenizers`` library,
  no special tokens added) and followed by the end-of-sequence token; the documents are joined into
  one stream and cut into windows ``[bos, t_k, ..., t_{k+seq_len-2}]`` of ``seq_len`` tokens (the
  stream's tail shorter than a window is dropped). Every window starts with the beginning-of-sequence
  token, so each is a context the teacher has seen in pretraining (Gemma needs its ``<bos>``).
- ``tfds:NAME[:SPLIT]``: a text dataset prepared as array_record (C4, for example: ``tfds build c4/en
  --file_format array_record``); example ``i`` is one window: ``bos`` and the first ``seq_len - 1``
  tokens of its ``text`` feature, right-padded with the pad token (``attention_mask`` 0 there).

Rows are ``{"input_ids": [B, seq_len] int32, "attention_mask": [B, seq_len] int32}`` (1 on real
tokens). The last ``HELDOUT_FRACTION`` of the windows (at least one, at most ``MAX_HELDOUT``) is held
out: training never reads it, :meth:`TextSource.heldout` returns it. Training batches follow the
contract of :mod:`fraqat_jax.data.sources` (a deterministic function of the data position, each host
reading its own rows), so the position saved in a checkpoint resumes the same stream.

A source that cannot be used raises :class:`~fraqat_jax.data.sources.DataSourceError` (one line):
no ``tokenizer.json`` in the teacher folder, a missing, empty or unreadable file, a ``.jsonl`` line
without a ``text`` string, fewer tokens than two windows, or ``seq_len`` longer than the teacher's
positions.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from fraqat_jax.data.sources import DataSourceError, Source, open_tfds

__all__ = ["HELDOUT_FRACTION", "MAX_HELDOUT", "TEXT_SUFFIXES", "SpecialTokens", "TextSource", "TfdsTextSource",
           "check_seq_len", "load_tokenizer", "make_text_source", "pack_windows", "read_documents",
           "tokenize_documents"]

TEXT_SUFFIXES = (".txt", ".jsonl")
HELDOUT_FRACTION = 1 / 50
MAX_HELDOUT = 1024
TOKENIZER_FILE = "tokenizer.json"


class SpecialTokens:
    """The ids a window needs, from the teacher's ``config.json``: ``bos``, ``eos`` and ``pad`` (the
    pad token defaults to ``eos`` when the config names none)."""

    def __init__(self, bos: int, eos: int, pad: int | None = None):
        self.bos, self.eos = int(bos), int(eos)
        self.pad = self.eos if pad is None else int(pad)

    @classmethod
    def from_config(cls, config: dict, source: str = "text") -> "SpecialTokens":
        ids = {}
        for name in ("bos_token_id", "eos_token_id"):
            value = config.get(name)
            if isinstance(value, list):  # transformers allows several end tokens: the first one ends documents
                value = value[0] if value else None
            if value is None:
                raise DataSourceError(source, f"cannot be cut into windows: the teacher's config.json has no {name}")
            ids[name] = int(value)
        return cls(ids["bos_token_id"], ids["eos_token_id"], config.get("pad_token_id"))


def load_tokenizer(folder: str, source: str = "text"):
    """The ``tokenizers.Tokenizer`` of a teacher folder's ``tokenizer.json``."""
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise DataSourceError(source, f"cannot be tokenized: the teacher folder {folder!r} has no {TOKENIZER_FILE}; "
                                      "put the teacher's tokenizer.json there (transformers model folders ship one)")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exceptions
        raise DataSourceError(source, f"cannot be tokenized: {path} is not a tokenizers file ({e})") from None


def check_seq_len(seq_len: int, max_positions: int | None, source: str = "text") -> None:
    """``seq_len`` must be at least 2 and at most the teacher's ``max_position_embeddings``."""
    if seq_len < 2:
        raise DataSourceError(source, f"cannot be cut into seq_len={seq_len} windows: use seq_len >= 2")
    if max_positions is not None and seq_len > int(max_positions):
        raise DataSourceError(source, f"cannot be cut into seq_len={seq_len} windows: the teacher takes at most "
                                      f"{int(max_positions)} positions (max_position_embeddings); use seq_len <= "
                                      f"{int(max_positions)}")


def _text_files(path: str, source: str) -> list[str]:
    if os.path.isfile(path):
        if not path.endswith(TEXT_SUFFIXES):
            raise DataSourceError(source, "is not a text file: use a .txt or .jsonl file or a folder of them")
        return [path]
    if os.path.isdir(path):
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.endswith(TEXT_SUFFIXES))
        if not found:
            raise DataSourceError(source, "holds no .txt or .jsonl file: use a folder of text files")
        return found
    raise DataSourceError(source, "does not exist: use a .txt or .jsonl file or a folder of them")


def read_documents(path: str, source: str | None = None) -> list[str]:
    """The documents of ``text:PATH`` in order: a ``.txt`` file is one document, a ``.jsonl`` file one
    per line (its ``text`` field; blank lines are skipped). Empty documents are dropped; no document
    at all is an error."""
    source = source or f"text:{path}"
    docs = []
    for file in _text_files(path, source):
        try:
            with open(file, encoding="utf-8") as f:
                if file.endswith(".txt"):
                    docs.append(f.read())
                    continue
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataSourceError(source, f"cannot be read: {file} line {number} is not JSON ({e.msg})")
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise DataSourceError(source, f"cannot be read: {file} line {number} has no 'text' string "
                                                      "field; each .jsonl line must be an object with one")
                    docs.append(row["text"])
        except UnicodeDecodeError as e:
            raise DataSourceError(source, f"cannot be read: {file} is not UTF-8 text ({e.reason} at byte "
                                          f"{e.start})") from None
        except OSError as e:
            raise DataSourceError(source, f"cannot be read: {file}: {e.strerror or e}") from None
    docs = [d for d in docs if d]
    if not docs:
        raise DataSourceError(source, "is empty: it holds no text")
    return docs


def tokenize_documents(tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each document (int32), no special tokens added."""
    encoded = tokenizer.encode_batch(list(docs), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encoded]


def pack_windows(token_docs: Sequence[np.ndarray], seq_len: int, tokens: SpecialTokens) -> np.ndarray:
    """``[N, seq_len]`` int32 windows: each document followed by ``eos``, all joined, cut into pieces of
    ``seq_len - 1`` tokens, each prefixed by ``bos`` (see the module docstring)."""
    body = seq_len - 1
    stream = np.concatenate([np.append(np.asarray(d, np.int32), np.int32(tokens.eos)) for d in token_docs])
    n = len(stream) // body
    windows = np.empty((n, seq_len), np.int32)
    windows[:, 0] = tokens.bos
    windows[:, 1:] = stream[:n * body].reshape(n, body)
    return windows


def _heldout_count(n: int) -> int:
    return min(MAX_HELDOUT, max(1, math.ceil(n * HELDOUT_FRACTION)))


class TextSource(Source):
    """In-memory token windows (``[N, seq_len]`` int32) with the last ones held out."""

    def __init__(self, windows: np.ndarray, *, seed: int = 0, source: str = "text", tokenizer=None):
        self.tokenizer = tokenizer  # the tokenizer that made the windows (for decoding), if known
        windows = np.asarray(windows, np.int32)
        if windows.ndim != 2 or len(windows) < 2:
            raise DataSourceError(source, f"gives {len(windows)} window(s) of {windows.shape[-1]} tokens; at least 2 "
                                          "are needed (one is held out): use more text or a shorter seq_len")
        self.seed = int(seed)
        self.seq_len = int(windows.shape[1])
        held = _heldout_count(len(windows))
        self.windows, self.heldout_windows = windows[:-held], windows[-held:]
        self.num_examples = len(self.windows)
        self.element_spec = {"input_ids": ((self.seq_len,), np.dtype(np.int32)),
                             "attention_mask": ((self.seq_len,), np.dtype(np.int32))}

    def _gather(self, indices):
        ids = self.windows[indices]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def heldout(self, num: int | None = None) -> dict[str, np.ndarray]:
        """The first ``num`` held-out windows (all when None; they repeat if fewer are held out)."""
        n = len(self.heldout_windows) if num is None else int(num)
        ids = self.heldout_windows[np.arange(n) % len(self.heldout_windows)]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


class TfdsTextSource(Source):
    """A prepared TFDS text dataset read by index: example ``i`` is one right-padded window."""

    def __init__(self, name: str, split: str, tokenizer, tokens: SpecialTokens, seq_len: int, *, seed: int = 0,
                 data_dir: str | None = None, text_key: str = "text"):
        spec = f"tfds:{name}:{split}"
        self.ds = open_tfds(name, split, data_dir)
        self.tokenizer, self.tokens, self.seq_len, self.text_key = tokenizer, tokens, int(seq_len), text_key
        self.seed = int(seed)
        total = len(self.ds)
        if total < 2:
            raise DataSourceError(spec, f"has {total} example(s); at least 2 are needed (one is held out)")
        first = self.ds[0]
        if text_key not in first:
            raise DataSourceError(spec, f"cannot be used: the dataset has no feature {text_key!r} (it has "
                                        f"{sorted(first)}); use a dataset of text")
        held = _heldout_count(total)
        self.num_examples, self.heldout_start, self.num_heldout = total - held, total - held, held
        self.element_spec = {"input_ids": ((self.seq_len,), np.dtype(np.int32)),
                             "attention_mask": ((self.seq_len,), np.dtype(np.int32))}

    def _windows(self, indices) -> dict[str, np.ndarray]:
        texts = []
        for i in indices:
            value = self.ds[int(i)][self.text_key]
            texts.append(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value))
        ids = np.full((len(texts), self.seq_len), self.tokens.pad, np.int32)
        mask = np.zeros((len(texts), self.seq_len), np.int32)
        for row, e in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            body = e.ids[:self.seq_len - 1]
            ids[row, 0] = self.tokens.bos
            ids[row, 1:1 + len(body)] = body
            mask[row, :1 + len(body)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _gather(self, indices):
        return self._windows(indices)

    def heldout(self, num: int | None = None) -> dict[str, np.ndarray]:
        n = self.num_heldout if num is None else int(num)
        return self._windows(self.heldout_start + np.arange(n) % self.num_heldout)


def make_text_source(spec: str, *, tokenizer_dir: str, model_config: dict, seq_len: int, seed: int = 0,
                     data_dir: str | None = None):
    """A :class:`TextSource` (``text:PATH``) or :class:`TfdsTextSource` (``tfds:NAME[:SPLIT]``) cut into
    ``seq_len`` windows with the tokenizer of ``tokenizer_dir`` and the special tokens and position
    count (``max_position_embeddings``) of ``model_config``."""
    if not (spec.startswith("text:") or spec.startswith("tfds:")):
        raise DataSourceError(spec, "is not a text source: use text:PATH (a .txt / .jsonl file or a folder of "
                                    "them) or tfds:NAME[:SPLIT]")
    check_seq_len(int(seq_len), model_config.get("max_position_embeddings"), spec)
    tokens = SpecialTokens.from_config(model_config, spec)
    tokenizer = load_tokenizer(tokenizer_dir, spec)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsTextSource(name, split or "train", tokenizer, tokens, int(seq_len), seed=seed, data_dir=data_dir)
    docs = read_documents(spec[len("text:"):], spec)
    windows = pack_windows(tokenize_documents(tokenizer, docs), int(seq_len), tokens)
    return TextSource(windows, seed=seed, source=spec, tokenizer=tokenizer)

