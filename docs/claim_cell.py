"""Reproduces docs/claim.md: ``python docs/claim_cell.py <compare arguments>`` is
``python -m fraqat_jax.compare`` with three candidate schedules registered as methods. They lost
or tied (docs/claim.md), so they are not in ``fraqat_jax.schedules``; this script patches them
in for the experiment only (it touches the trainer's private list of schedule choices).


nested:       stages at the widths whose symmetric grid contains the target grid (qmax = 2^k * qmax_t),
              stage lengths of the integer staircase (2, 3, 3, 3 of 25 epochs above the target, 14 at it)
early:        FraQAT's stages, but the above-target part squeezed into the first 12% of the steps
nested_early: nested widths, above-target part in the first 12%
"""
import math
import sys

from fraqat_jax import schedules as S
from fraqat_jax.train import config as C


def nested_width(t, k):
    return 1.0 + math.log2((2.0 ** (t - 1.0) - 1.0) * 2.0 ** k + 1.0)


def stages(name, t):
    if name == "nested":
        return [(nested_width(t, 4), 2), (nested_width(t, 3), 3), (nested_width(t, 2), 3), (nested_width(t, 1), 3), (t, 14)]
    if name == "early":
        shift = t - 4.0
        return [(b + shift, n) for b, n in S.FRAQAT_STAGES[:-1]] + [(t, 81)]
    if name == "nested_early":
        return [(nested_width(t, 4), 2), (nested_width(t, 3), 3), (nested_width(t, 2), 3), (nested_width(t, 1), 3), (t, 81)]
    raise KeyError(name)


EXTRA = ("nested", "early", "nested_early")
_orig = S.by_name


def by_name(name, total_steps, *, target_bits=4.0, start_bits=8.0):
    if name in EXTRA:
        return S.scale_to(S.staircase(stages(name, float(target_bits)), name=name), total_steps)
    return _orig(name, total_steps, target_bits=target_bits, start_bits=start_bits)


S.by_name = by_name
S.NAMES = tuple(S.NAMES) + EXTRA
C._CHOICES["schedule"] = tuple(C._CHOICES["schedule"]) + EXTRA

if __name__ == "__main__":
    from fraqat_jax import compare

    compare.main(sys.argv[1:])
