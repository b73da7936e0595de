"""Deterministic random-access data sources (see the package docstring for the contract)."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ArraySource", "DataSourceError", "Source", "TfdsSource", "digits", "epoch_permutation",
           "global_indices", "host_rows", "open_tfds"]


class DataSourceError(ValueError):
    """A data source that cannot be opened or does not fit the teacher. The message is one line
    naming the source (``tfds:NAME:SPLIT``, ``latents:DIR``, ...) and saying what to do."""

    def __init__(self, source: str, problem: str):
        self.source = source
        super().__init__(" ".join(f"data source {source!r} {problem}".split()))


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
        self.name, self.split = name, split
        self.ds = open_tfds(name, split, data_dir)
        self.seed = int(seed)
        self.num_examples = len(self.ds)
        self.image_key, self.label_key = image_key, label_key
        spec = f"tfds:{name}:{split}"
        if self.num_examples == 0:
            raise DataSourceError(spec, "cannot be used: the split has no examples; pick a split that has some")
        first = self.ds[0]
        if image_key not in first:
            raise DataSourceError(spec, f"cannot be used: the dataset has no feature {image_key!r} (it has {sorted(first)}); "
                                  "use a dataset of images")
        shape = np.asarray(first[image_key]).shape
        if len(shape) != 3:
            raise DataSourceError(spec, f"cannot be used: feature {image_key!r} has shape {shape}, not an image [H, W, C]")
        h, _, c = shape
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


def open_tfds(name: str, split: str, data_dir: str | None):
    """``tfds.data_source`` of a dataset already prepared (as array_record) in ``data_dir``; nothing is
    downloaded: on a pod every host would prepare it at once. Failures become one-line
    ``DataSourceError``s that say how to prepare the dataset."""
    spec = f"tfds:{name}:{split}"
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataSourceError(spec, f"needs tensorflow-datasets ({e}): pip install tensorflow-datasets") from None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(os.path.join("~", "tensorflow_datasets"))
    prepare = (f"prepare it into data_dir first: tfds build {name.split('/')[0]} --data_dir {where} "
               "--file_format array_record" + ("" if data_dir else " (or --set data_dir=DIR where it is prepared)"))
    try:
        with _quiet_absl():
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataSourceError(spec, f"cannot be opened: TFDS knows no dataset {name!r} and none is prepared in data_dir {where}; "
                                    f"check the name, or {prepare}") from None
    except Exception as e:  # tfds raises many types (NotImplementedError, AssertionError, ValueError...)
        error = e
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=data_dir)
            prepared, splits = builder.is_prepared(), sorted(builder.info.splits)
    except Exception:  # the builder itself cannot be made: report the first error
        prepared, splits = None, []
    if prepared is False:
        raise DataSourceError(spec, f"cannot be opened: dataset {name!r} is not prepared in data_dir {where}; {prepare}") from None
    if prepared and splits and split.split("[")[0] not in splits:
        raise DataSourceError(spec, f"cannot be opened: dataset {name!r} has no split {split!r}; its splits: {', '.join(splits)}") from None
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise DataSourceError(spec, f"cannot be opened ({type(error).__name__}: {first_line}); random access needs the "
                                f"array_record format, so {prepare}") from None


@contextlib.contextmanager
def _quiet_absl():
    """Silences tfds' absl warnings while a dataset is opened: on an unprepared ``data_dir`` it logs
    one per probed folder, and the error raised after them already says what is wrong."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
