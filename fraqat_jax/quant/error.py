"""How far a quantized form's output is from its reference: the one relative difference that every
export check and test reports (host numpy, float64)."""

from __future__ import annotations

import numpy as np


def rel_diff(got, ref) -> float:
    """``max |got - ref| / max |ref|`` in float64 (``max |ref|`` floored at 1e-12).

    ``got`` and ``ref`` are arrays of one shape, or equal-length sequences (lists or tuples) of such
    pairs, e.g. the outputs on several held-out batches: then the largest difference over all pairs
    is divided by the largest ``|ref|`` over all of them, one scale for the whole set."""
    many = isinstance(got, (list, tuple))
    if many and not (isinstance(ref, (list, tuple)) and len(ref) == len(got) > 0):
        raise ValueError(f"rel_diff takes two arrays or two non-empty sequences of one length, got "
                         f"{type(got).__name__} of {len(got)} and {type(ref).__name__}")
    pairs = list(zip(got, ref)) if many else [(got, ref)]
    diffs, scales = [], []
    for g, r in pairs:
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        if g.shape != r.shape:
            raise ValueError(f"rel_diff compares arrays of one shape, got {g.shape} and {r.shape}")
        diffs.append(float(np.abs(g - r).max()))
        scales.append(float(np.abs(r).max()))
    return max(diffs) / max(max(scales), 1e-12)
