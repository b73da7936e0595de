"""Does a data source fit the teacher? A pure check on shapes, run before any step is compiled.

A source whose latents the teacher cannot take would otherwise fail deep inside the jitted step
(a reshape in patchify, a convolution's channel count) with a trace that names neither the source
nor the setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fraqat_jax.data.sources import DataSourceError

__all__ = ["check_fits_teacher"]


def check_fits_teacher(source: str, element_spec: Mapping[str, tuple[tuple[int, ...], Any]],
                       model_config: Mapping[str, Any], *, family: str, packed: bool = False) -> None:
    """Raises :class:`DataSourceError` (one line naming ``source``) when the teacher cannot take the
    source's ``latents`` rows.

    ``source``: the data spec as the user wrote it (``tfds:NAME``, ``latents:DIR``, ...);
    ``element_spec``: the source's ``{field: (per-example shape, dtype)}``, ``latents`` being
    ``[C, H, W]``; ``model_config``: the teacher's diffusers config (``in_channels``,
    ``patch_size``, ``pos_embed_max_size``); ``family``: the family's name (for the message); ``packed``: the model
    packs 2x2 latent patches into tokens (Flux), so it takes ``C = in_channels / 4`` and even sizes.
    """
    if "latents" not in element_spec:
        raise DataSourceError(source, f"has no 'latents' field (it has {sorted(element_spec)}); the teacher "
                                      "needs latents [C, H, W]")
    shape = tuple(int(d) for d in element_spec["latents"][0])
    if len(shape) != 3:
        raise DataSourceError(source, f"gives latents of shape {list(shape)} per example; the teacher needs [C, H, W]")
    c, h, w = shape
    patch = 2 if packed else int(model_config.get("patch_size") or 1)
    in_channels = model_config.get("in_channels")
    resize = _how_to_resize(source)
    if in_channels:
        want = int(in_channels) // 4 if packed else int(in_channels)
        if c != want:
            raise DataSourceError(source, f"gives latents with {c} channels but the {family} teacher takes {want} "
                                          f"(in_channels={in_channels}{', packed 2x2' if packed else ''}); "
                                          "use data or a teacher whose channel counts agree")
    for side, size in (("height", h), ("width", w)):
        if size < patch or size % patch:
            fix = max(patch, round(size / patch) * patch)
            raise DataSourceError(source, f"gives latents {list(shape)} whose {side} {size} the {family} teacher "
                                          f"cannot take: it must be a multiple of {patch} (the "
                                          f"{'2x2 packing' if packed else 'patch_size'}); {resize} {fix}")
    max_patches = model_config.get("pos_embed_max_size")
    if max_patches and max(h, w) > int(max_patches) * patch:
        raise DataSourceError(source, f"gives latents {list(shape)} larger than the {family} teacher takes: at most "
                                      f"{int(max_patches) * patch} per side (pos_embed_max_size={max_patches} "
                                      f"patches of {patch}); {resize} {int(max_patches) * patch}")


def _how_to_resize(source: str) -> str:
    if source.startswith("tfds:"):
        return "set image_size to a size it takes, e.g."
    if source.startswith("latents:"):
        return "cache latents of a size it takes, e.g."
    return "use data of a size it takes, e.g."
