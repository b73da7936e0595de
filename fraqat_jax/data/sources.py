"""Deterministic random-access data sources (see the package docstring for the contract)."""

from __future__ import annotations

import importlib.resources
from typing import Any, Mapping

import numpy as np

__all__ = ["ArraySource", "Source", "TfdsSource", "digits", "epoch_permutation", "global_indices", "host_rows"]


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffle of epoch ``epoch``: a permutation of ``range(num_examples)`` fixed by ``seed``."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    return rng.permutation(num_examples)


def global_indices(seed: int, position: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Example indices of global batch ``position`` ([batch_size] int64); epochs wrap around."""
    if position < 0:
        raise ValueError(f"data position must be >= 0, got {position}")
    flat = np.arange(position * batch_size, (position + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(flat, num_examples)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(seed, int(e), num_examples)[offsets[sel]]
    return out


def host_rows(batch_size: int, host_index: int, host_count: int) -> slice:
    """The rows of a global batch that host ``host_index`` of ``host_count`` loads."""
    if host_count < 1 or not 0 <= host_index < host_count:
        raise ValueError(f"host_index must be in [0, {host_count}), got {host_index}")
    if batch_size % host_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by the host count {host_count}")
    per_host = batch_size // host_count
    return slice(host_index * per_host, (host_index + 1) * per_host)


class Source:
    """Base class: subclasses define ``num_examples``, ``element_spec`` and ``_gather(indices)``."""

    seed: int
    num_examples: int
    element_spec: Mapping[str, tuple[tuple[int, ...], Any]]

    def _gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(self, position: int, batch_size: int, *, host_index: int = 0, host_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of global batch number ``position`` (dict of numpy arrays)."""
        idx = global_indices(self.seed, position, batch_size, self.num_examples)
        return self._gather(idx[host_rows(batch_size, host_index, host_count)])


class ArraySource(Source):
    """In-memory (or memory-mapped) arrays with a common leading example axis."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, seed: int = 0):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must have the same number of examples, got {lengths}")
        self.arrays = dict(arrays)
        self.seed = int(seed)
        self.num_examples = next(iter(lengths.values()))
        self.element_spec = {k: (tuple(v.shape[1:]), np.dtype(v.dtype)) for k, v in self.arrays.items()}

    def _gather(self, indices):
        order = np.argsort(indices)  # sorted reads are much faster on memory-mapped files
        out = {}
        for k, v in self.arrays.items():
            rows = np.asarray(v[indices[order]])
            out[k] = np.empty_like(rows)
            out[k][order] = rows
        return out


def digits(*, seed: int = 0) -> ArraySource:
    """The shipped UCI digits: ``latents`` [1, 8, 8] in [-1, 1] and ``class_labels`` in 0..9."""
    with importlib.resources.files("fraqat_jax").joinpath("assets", "digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    latents = (images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return ArraySource({"latents": latents, "class_labels": labels.astype(np.int32)}, seed=seed)


def _resize_area(images: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, C] -> [N, size, size, C] by bilinear (antialiased) resizing."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    import jax

    out_shape = (images.shape[0], size, size, images.shape[3])
    return np.asarray(jax.image.resize(images, out_shape, method="linear", antialias=True))


class TfdsSource(Source):
    """A TFDS dataset read by index through ``tfds.data_source`` (needs no tensorflow).

    Each host reads only its own rows of each global batch. Images (uint8 HWC) become ``latents``
    [C, image_size, image_size] in [-1, 1]; ``label_key`` (if present) becomes ``class_labels``.
    """

    def __init__(self, name: str, split: str = "train", *, seed: int = 0, image_size: int | None = None,
                 image_key: str = "image", label_key: str = "label", data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for unknown or missing datasets
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r}: {type(e).__name__}: {e}") from e
        self.seed = int(seed)
        self.num_examples = len(self.ds)
        self.image_key, self.label_key = image_key, label_key
        first = self.ds[0]
        if image_key not in first:
            raise ValueError(f"TFDS dataset {name!r} has no feature {image_key!r}; it has {sorted(first)}")
        h, w, c = np.asarray(first[image_key]).shape
        self.image_size = int(image_size or h)
        self.has_labels = label_key in first
        self.element_spec = {"latents": ((c, self.image_size, self.image_size), np.dtype(np.float32))}
        if self.has_labels:
            self.element_spec["class_labels"] = ((), np.dtype(np.int32))

    def _gather(self, indices):
        examples = [self.ds[int(i)] for i in indices]
        images = np.stack([np.asarray(ex[self.image_key]) for ex in examples]).astype(np.float32)
        images = _resize_area(images / 127.5 - 1.0, self.image_size)
        out = {"latents": np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)}
        if self.has_labels:
            out["class_labels"] = np.asarray([int(ex[self.label_key]) for ex in examples], dtype=np.int32)
        return out
