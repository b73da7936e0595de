"""Data-free distillation inputs: noise pushed through the teacher's own sampler.

With no data at hand, the clean latents a student is trained on can be the teacher's own samples:
``generate(key, n) -> {"latents": [n, C, H, W], "class_labels": [n], ...}`` runs the teacher's
sampling trajectory from fresh noise (the trainer builds it from the teacher and the family's
sampler). Global batch ``position`` uses ``fold_in(key(seed), position)``, so the stream is as
deterministic and resumable as the dataset sources; each host keeps its rows of the global batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from fraqat_jax.data.sources import host_rows

__all__ = ["DataFreeSource"]


class DataFreeSource:
    def __init__(self, generate: Callable[[jax.Array, int], Mapping[str, Any]],
                 element_spec: Mapping[str, tuple[tuple[int, ...], Any]], *, seed: int = 0):
        self.generate = generate
        self.element_spec = dict(element_spec)
        self.seed = int(seed)
        self.num_examples = None  # unbounded

    def batch(self, position: int, batch_size: int, *, host_index: int = 0, host_count: int = 1) -> dict[str, np.ndarray]:
        if position < 0:
            raise ValueError(f"data position must be >= 0, got {position}")
        rows = host_rows(batch_size, host_index, host_count)
        key = jax.random.fold_in(jax.random.key(self.seed), position)
        out = self.generate(key, batch_size)
        return {k: np.asarray(v)[rows] for k, v in out.items()}
