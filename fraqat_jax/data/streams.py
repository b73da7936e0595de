"""Named random streams: which draws of a run use which seed.

Each use of randomness has a name, and :func:`stream` gives its integer seed from the run's seed.
:data:`OFFSETS` is the one table from name to offset; the offsets are the ones the code used
before the streams had names, so runs made since give the same draws and earlier comparisons pool
with new seeds.

===================  ==========  ============================================================
name                 offset      draws
===================  ==========  ============================================================
``data``             0           the data source's shuffle (and the train step's key)
``datafree``         1           the data-free source: the teacher's samples as training data
``sample_grid``      2           the noise and sampler key of the sample grids
``calibration``      3           the trainer's calibration inputs (static activation ranges)
``export``           7919        the export's calibration and held-out inputs (from its seed)
``eval_samples``     1           the evaluator's conditioning rows, the t2i sampler's key (from its seed)
``validation``       1_000_003   the evaluator's held-out validation inputs and their data
===================  ==========  ============================================================
"""

from __future__ import annotations

__all__ = ["OFFSETS", "stream"]

OFFSETS = {
    "data": 0,
    "datafree": 1,
    "sample_grid": 2,
    "calibration": 3,
    "export": 7919,
    "eval_samples": 1,
    "validation": 1_000_003,
}


def stream(seed: int, name: str) -> int:
    """The seed of stream ``name`` for base ``seed`` (``seed + OFFSETS[name]``); ``ValueError``
    naming the known streams for an unknown name."""
    if name not in OFFSETS:
        raise ValueError(f"unknown random stream {name!r}; known: {', '.join(OFFSETS)}")
    return int(seed) + OFFSETS[name]
