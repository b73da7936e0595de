"""PNG sample grids: one row of images per model (teacher above student), what a diffusion run writes."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["save_grid"]


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [N, H, W, 3] in [0, 1]: pixels in [-1, 1] mapped directly, latents
    (C not 1 or 3) shown by their first three channels, each image normalised to its own range."""
    n, c, h, w = images.shape
    if c in (1, 3):
        x = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
        x = np.repeat(x, 3, axis=1) if c == 1 else x
    else:
        x = images[:, :3] if c >= 3 else np.repeat(images[:, :1], 3, axis=1)
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-6)
    return x.transpose(0, 2, 3, 1)


def save_grid(path: str, rows: list[np.ndarray], *, min_size: int = 64, pad: int = 1) -> np.ndarray:
    """Saves a PNG with one row per array in ``rows`` (each [N, C, H, W]); returns the HWC uint8 image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    rgb = [_to_rgb(np.asarray(r, np.float32)) for r in rows]
    n, h, w, _ = rgb[0].shape
    scale = max(1, min_size // max(h, w))
    hs, ws = h * scale, w * scale
    grid = np.ones((len(rgb) * (hs + pad) + pad, n * (ws + pad) + pad, 3), np.float32)
    for i, r in enumerate(rgb):
        for j in range(n):
            tile = np.kron(r[j], np.ones((scale, scale, 1), np.float32))
            y, x = pad + i * (hs + pad), pad + j * (ws + pad)
            grid[y:y + hs, x:x + ws] = tile
    image = (grid * 255).round().astype(np.uint8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    mpimg.imsave(path, image)
    return image
