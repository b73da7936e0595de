"""Data sources for FraQAT distillation.

Every source is a deterministic, random-access function of the *data position* (the number of
global batches consumed so far), so the position saved in a checkpoint is enough to resume the
exact same stream, and each host can read only its own rows::

    src = make_source("digits", seed=0)          # or "tfds:mnist", "latents:/dir", "datafree"
    src.element_spec                             # {"latents": ((1, 8, 8), float32), "class_labels": ((), int32)}
    rows = src.batch(position, batch_size, host_index=jax.process_index(), host_count=jax.process_count())

``batch`` returns a dict of numpy arrays holding this host's ``batch_size // host_count`` rows of
global batch number ``position`` (examples ``perm_e[i]`` for ``i`` in ``[position * batch_size,
(position + 1) * batch_size)`` where ``perm_e`` is the seed's shuffle of epoch ``e``). Keys:

- ``latents``: ``[B, C, H, W]`` float32, the clean model input (pixels in [-1, 1] for the digits
  DiT, VAE latents for the text-to-image models);
- conditioning, named like the diffusers model arguments: ``class_labels`` ``[B]`` int32,
  ``encoder_hidden_states`` ``[B, L, D]``, ``pooled_projections`` ``[B, D]``.

Sources:

- ``digits``: the 1797 8x8 UCI digits shipped in ``fraqat_jax/assets/digits.npz`` (CC BY 4.0).
- ``tfds:NAME[:SPLIT]``: ``tfds.data_source`` (random access, array_record; works without
  tensorflow), images resized to ``image_size`` and scaled to [-1, 1], labels -> ``class_labels``.
- ``latents:DIR``: cached latents and text embeddings, see :mod:`fraqat_jax.data.latents` for the
  on-disk format and ``scripts/cache_latents.py`` for a writer.
- ``datafree``: noise pushed through the teacher's own sampler (see :mod:`fraqat_jax.data.datafree`);
  built by the trainer because it needs the teacher.
"""

from __future__ import annotations

from fraqat_jax.data.checks import check_fits_teacher
from fraqat_jax.data.datafree import DataFreeSource
from fraqat_jax.data.latents import LatentsWriter, read_latents, write_latents
from fraqat_jax.data.sources import (
    ArraySource,
    DataSourceError,
    Source,
    TfdsSource,
    digits,
)

__all__ = ["ArraySource", "DataFreeSource", "DataSourceError", "LatentsWriter", "Source", "TfdsSource",
           "check_fits_teacher", "digits", "make_source", "read_latents", "write_latents"]


def make_source(spec: str, *, seed: int = 0, image_size: int | None = None, data_dir: str | None = None):
    """A source from its name: ``digits``, ``tfds:NAME[:SPLIT]`` or ``latents:DIR``.

    (``datafree`` needs a teacher: build :class:`DataFreeSource` directly.) A source that cannot be
    opened raises :class:`DataSourceError`, one line naming it and saying what to do; TFDS datasets
    are never downloaded here: they must be prepared (as array_record) in ``data_dir`` first.
    """
    if spec == "digits":
        return digits(seed=seed)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsSource(name, split or "train", seed=seed, image_size=image_size, data_dir=data_dir or None)
    if spec.startswith("latents:"):
        return read_latents(spec[len("latents:"):], seed=seed)
    raise DataSourceError(spec, "is not allowed: use digits, tfds:NAME[:SPLIT], latents:DIR "
                                "(datafree is built by the trainer)")
