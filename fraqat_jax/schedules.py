"""Bit-width schedules: ``step -> bits`` as a float32 scalar, traceable inside ``jax.jit``.

A schedule is a :class:`Schedule`: call it with a step (a Python int or a traced integer, counted
from 0) to get the weight bit-width that step trains at. ``total_steps`` is its nominal length;
after it the last value holds. Because the step is data, a jitted train step that computes
``bits = schedule(step)`` compiles once for the whole run.

Staircases (the paper's form) hold each bit-width for a whole stage:

* :func:`fraqat`: Table 4 of the paper, 8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4 bits for
  1, 1, 1, 1, 1, 2, 2, 2, 14 epochs (25 in all).
* :func:`integer` (8, 7, 6, 5, 4) and :func:`simple` (16, 8, 4): the paper's ablation baselines.
  Each keeps FraQAT's last 14 epochs at 4 bits and spreads FraQAT's 11 earlier epochs over its
  higher widths as evenly as it can (integer: 2, 3, 3, 3; simple: 5, 6), so the three compare at
  equal compute and equal time at the target, and differ only in how they come down.
* :func:`constant`: vanilla QAT.

Candidates beyond the paper (``docs/claim.md`` measures them against vanilla QAT):

* :func:`nested`: stages at the widths whose symmetric grids contain the target's
  (``qmax = 2^k * qmax_target``, :func:`nested_width`), so a weight that sits on a target-grid
  point stays on it when the width falls; the integer staircase's stage lengths.
* :func:`early` and :func:`nested_early`: the above-target stages of ``fraqat`` / ``nested``
  squeezed into the first 12% of the steps (11 of 92 epochs), so most steps train at the target.

Smooth schedules, beyond the paper: :func:`linear` and :func:`cosine`. By name, ``linear`` and
``cosine`` descend over the whole run and reach the target only at its last step; the form
``linear:F`` / ``cosine:F`` (``F`` in (0, 1]) descends over the first fraction ``F`` of the steps and
then holds the target, so ``linear:0.44`` comes down over the same span as the paper's staircase
(its first 11 of 25 epochs; ``linear:`` with no fraction means that span, :data:`STAIRCASE_SPAN`).

:func:`scale_to` stretches or shrinks any schedule to a given number of steps keeping its stage
proportions; :func:`by_name` builds a named schedule of a given length and target bit-width.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from fraqat_jax.quant.fake import MAX_BITS, MIN_BITS, check_bits

FRAQAT_STAGES = ((8.0, 1), (7.0, 1), (6.0, 1), (5.5, 1), (5.0, 1), (4.75, 2), (4.5, 2), (4.25, 2), (4.0, 14))
INTEGER_STAGES = ((8.0, 2), (7.0, 3), (6.0, 3), (5.0, 3), (4.0, 14))
SIMPLE_STAGES = ((16.0, 5), (8.0, 6), (4.0, 14))
PAPER_TARGET_BITS = 4.0

NESTED_MARGIN = 1e-3  # levels; see nested_width
EARLY_TARGET_EPOCHS = 81  # 11 epochs above the target are 12% of 92

NAMES = ("fraqat", "integer", "simple", "constant", "linear", "cosine", "nested", "early", "nested_early")
SMOOTH = ("linear", "cosine")  # the names whose Schedule has no stages
STAIRCASE_SPAN = 11 / 25  # fraqat's epochs above the target / all its epochs


def parse_name(name: str) -> tuple[str, float | None]:
    """``"linear:0.44"`` -> ``("linear", 0.44)``; ``"fraqat"`` -> ``("fraqat", None)``.

    Raises ValueError naming the bad name and the allowed forms."""
    if not isinstance(name, str):
        raise ValueError(f"schedule {name!r} is not a name: use one of {', '.join(NAMES)}")
    base, sep, tail = name.partition(":")
    if base not in NAMES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(NAMES)}, or linear:F / cosine:F "
                         "(F in (0, 1]: the fraction of the run over which the bits descend)")
    if not sep:
        return base, None
    if base not in SMOOTH:
        raise ValueError(f"schedule {name!r}: only {' and '.join(SMOOTH)} take a fraction (e.g. linear:0.44)")
    if not tail:
        return base, STAIRCASE_SPAN
    try:
        frac = float(tail)
    except ValueError:
        frac = float("nan")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"schedule {name!r}: the fraction {tail!r} is not allowed: use a number in (0, 1], "
                         f"e.g. {base}:0.44 (the staircase's span)")
    return base, frac


def is_smooth(name: str) -> bool:
    """Whether the named schedule is continuous (no stages): ``linear``, ``cosine`` and their ``:F`` forms."""
    return parse_name(name)[0] in SMOOTH


class Schedule:
    """A bit-width schedule: ``schedule(step) -> float32 scalar``.

    Attributes:
      name: what it is (``"fraqat"``, ``"linear"``, ...).
      total_steps: nominal number of steps; after it the last bit-width holds.
      stages: for staircases, the ``((bits, num_steps), ...)`` it was built from; else None.
    """

    def __init__(self, name: str, total_steps: int, fn: Callable, stages=None, rescale=None):
        self.name = name
        self.total_steps = int(total_steps)
        self.stages = None if stages is None else tuple((float(b), int(n)) for b, n in stages)
        self._fn = fn
        self._rescale = rescale

    def __call__(self, step):
        return jnp.asarray(self._fn(jnp.asarray(step)), jnp.float32)

    def rescaled(self, total_steps: int) -> "Schedule":
        """The same schedule over ``total_steps`` steps (see :func:`scale_to`)."""
        return self._rescale(_check_steps(total_steps, "total_steps"))

    def values(self, num_steps: int | None = None) -> np.ndarray:
        """Bit-widths of steps ``0 .. num_steps - 1`` (default ``total_steps``) as numpy float32."""
        n = self.total_steps if num_steps is None else num_steps
        return np.asarray(self(jnp.arange(n)), np.float32)

    def __repr__(self):
        extra = f", stages={self.stages}" if self.stages is not None else ""
        return f"Schedule({self.name!r}, total_steps={self.total_steps}{extra})"


def _check_steps(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name}={n!r} is not allowed: use a positive int")
    return int(n)


def _check_bits_value(b, name="bits") -> float:
    check_bits(b, name=name)  # raises ValueError for a bad concrete value
    return float(b)


def staircase(stages: Sequence[tuple[float, int]], *, name: str = "staircase") -> Schedule:
    """Holds each ``bits`` for ``num_steps`` steps, in order; after the last stage its bits hold.

    ``staircase([(8, 3), (6, 2), (4, 5)])`` gives 8, 8, 8, 6, 6, 4, 4, 4, 4, 4 (total_steps 10).
    """
    stages = list(stages)
    if not stages:
        raise ValueError("stages is empty: give at least one (bits, num_steps) pair")
    clean = []
    for i, stage in enumerate(stages):
        try:
            b, n = stage
        except (TypeError, ValueError):
            raise ValueError(f"stage {i} = {stage!r} is not a (bits, num_steps) pair") from None
        clean.append((_check_bits_value(b, f"stages[{i}] bits"), _check_steps(n, f"stages[{i}] num_steps")))
    bits = jnp.asarray([b for b, _ in clean], jnp.float32)
    ends = np.cumsum([n for _, n in clean])
    # Stage index = number of stage ends at or before the step; the last stage never ends.
    inner_ends = jnp.asarray(ends[:-1], jnp.int32)

    def fn(step):
        idx = jnp.sum(jnp.asarray(step)[..., None] >= inner_ends, axis=-1)
        return bits[idx]

    def rescale(total):
        return staircase(_rescale_stages(clean, total), name=name)

    return Schedule(name, int(ends[-1]), fn, stages=clean, rescale=rescale)


def _rescale_stages(stages, total: int):
    """Stages over ``total`` steps with the same proportions (boundaries rounded half up), every
    stage keeping at least one step. A budget shorter than the stage count keeps the staircase's
    order from its start and still ends at the target: its first ``total - 1`` stages, then the
    last, one step each (fraqat over 5 steps: 8, 7, 6, 5.5, 4 bits)."""
    n = len(stages)
    if total < n:
        return [(b, 1) for b, _ in stages[:total - 1]] + [(stages[-1][0], 1)]
    lengths = np.asarray([s for _, s in stages], np.float64)
    cum = np.cumsum(lengths) / lengths.sum() * total
    ends = np.floor(cum + 0.5).astype(int)
    ends[-1] = total
    ends = np.clip(ends, np.arange(1, n + 1), total - np.arange(n - 1, -1, -1))
    for i in range(1, n):  # at least one step each: push a boundary that did not move
        ends[i] = max(ends[i], ends[i - 1] + 1)
    starts = np.concatenate([[0], ends[:-1]])
    return [(b, int(e - s)) for (b, _), s, e in zip(stages, starts, ends)]


def _shifted(stages, target_bits):
    shift = _check_bits_value(target_bits, "target_bits") - PAPER_TARGET_BITS
    return [(min(max(b + shift, MIN_BITS), MAX_BITS), n) for b, n in stages]


def fraqat(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """The paper's Table 4 staircase, ``steps_per_epoch`` steps per epoch (25 epochs).

    ``target_bits`` other than 4 shifts every stage by the same amount (clipped to [2, 16]), so the
    fractional fine steps stay just above the target.
    """
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    return staircase([(b, n * spe) for b, n in _shifted(FRAQAT_STAGES, target_bits)], name="fraqat")


def integer(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """8, 7, 6, 5, 4 bits for 2, 3, 3, 3, 14 epochs: FraQAT's 25 epochs, integer widths only."""
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    return staircase([(b, n * spe) for b, n in _shifted(INTEGER_STAGES, target_bits)], name="integer")


def simple(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """16, 8, 4 bits for 5, 6, 14 epochs: FraQAT's 25 epochs in three jumps."""
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    return staircase([(b, n * spe) for b, n in _shifted(SIMPLE_STAGES, target_bits)], name="simple")


def nested_width(target_bits: float, k: int) -> float:
    """The width whose symmetric grid has ``2^k`` times the target's levels per side:
    ``qmax(w) = 2^k * qmax(target_bits)`` with ``qmax(b) = 2^(b-1) - 1``, so every point of the
    target grid (same scale ``max|w| / qmax``) is a point of this one: its code is ``2^k`` times
    the target code. ``nested_width(4, 1)`` = 4.91. The width carries 1e-3 of a level more than the
    exact ``1 + log2(qmax + 1)``: the bit-width is a float32 in training, and ``2^(w-1)`` rounded
    just below an integer would lose the top code (``floor(2^(w-1)) - 1``) and move the largest
    weights; the margin moves the scale by 1e-3 / qmax, far less than a step of either grid."""
    t = _check_bits_value(target_bits, "target_bits")
    return 1.0 + math.log2((2.0 ** (t - 1.0) - 1.0) * 2.0 ** int(k) + 1.0 + NESTED_MARGIN)


def _nested_stages(target_bits, last_epochs):
    t = float(target_bits)
    return [(min(nested_width(t, k), MAX_BITS), n) for k, n in ((4, 2), (3, 3), (2, 3), (1, 3))] + [(t, last_epochs)]


def nested(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """Widths ``nested_width(target, k)`` for k = 4, 3, 2, 1 (7.82, 6.83, 5.86, 4.91 bits above a
    4-bit target) for 2, 3, 3, 3 epochs, then 14 at the target: the integer staircase's lengths."""
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    _check_bits_value(target_bits, "target_bits")
    return staircase([(b, n * spe) for b, n in _nested_stages(target_bits, 14)], name="nested")


def early(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """FraQAT's stages above the target (11 epochs), then 81 at the target: the target is reached
    after 12% of the steps instead of 44%."""
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    above = _shifted(FRAQAT_STAGES[:-1], target_bits)
    return staircase([(b, n * spe) for b, n in above + [(float(target_bits), EARLY_TARGET_EPOCHS)]], name="early")


def nested_early(steps_per_epoch: int = 1, *, target_bits: float = PAPER_TARGET_BITS) -> Schedule:
    """:func:`nested`'s widths and lengths above the target (11 epochs), then 81 at the target."""
    spe = _check_steps(steps_per_epoch, "steps_per_epoch")
    _check_bits_value(target_bits, "target_bits")
    stages = _nested_stages(target_bits, EARLY_TARGET_EPOCHS)
    return staircase([(b, n * spe) for b, n in stages], name="nested_early")


def constant(bits: float = PAPER_TARGET_BITS, num_steps: int = 1) -> Schedule:
    """Vanilla QAT: ``bits`` at every step (``num_steps`` only sets ``total_steps``)."""
    return staircase([(bits, num_steps)], name="constant")


def _smooth(name, start, end, num_steps, shape, fraction=None):
    """``fraction`` None: the descent ends at the last step (``num_steps - 1``); else at step
    ``round(fraction * num_steps)`` (at least 1), after which ``end`` holds."""
    start = _check_bits_value(start, "start")
    end = _check_bits_value(end, "end")
    n = _check_steps(num_steps, "num_steps")
    denom = float(max(n - 1, 1)) if fraction is None else float(max(int(math.floor(fraction * n + 0.5)), 1))

    def fn(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) / denom, 0.0, 1.0)
        return start + (end - start) * shape(t)

    full = name if fraction is None else f"{name}:{fraction:g}"
    return Schedule(full, n, fn, rescale=lambda total: _smooth(name, start, end, total, shape, fraction))


def _check_fraction(fraction):
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is not allowed: use a number in (0, 1] or None (the whole run)")
    return float(fraction)


def linear(start: float, end: float, num_steps: int, fraction: float | None = None) -> Schedule:
    """Bits move linearly from ``start`` (step 0) to ``end`` (step ``num_steps - 1``, or step
    ``round(fraction * num_steps)`` when ``fraction`` is given), then hold."""
    return _smooth("linear", start, end, num_steps, lambda t: t, _check_fraction(fraction))


def cosine(start: float, end: float, num_steps: int, fraction: float | None = None) -> Schedule:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``num_steps - 1``, or step
    ``round(fraction * num_steps)`` when ``fraction`` is given), then hold."""
    return _smooth("cosine", start, end, num_steps, lambda t: 0.5 * (1.0 - jnp.cos(math.pi * t)),
                   _check_fraction(fraction))


def scale_to(schedule: Schedule, total_steps: int) -> Schedule:
    """``schedule`` over ``total_steps`` steps, its stages keeping their proportions.

    Stage boundaries fall at ``round(total_steps * cumulative_fraction)``, so 25 steps of
    ``fraqat()`` visit 8, 7, 6, 5.5, 5, 4.75, 4.75, 4.5, 4.5, 4.25, 4.25, 4, ... and 2500 steps
    give 100 steps per epoch. Every stage keeps at least one step; fewer steps than stages keep the
    first stages and the last (9-stage ``fraqat()`` over 5 steps: 8, 7, 6, 5.5, 4). Smooth schedules
    are stretched to end at ``total_steps - 1``.
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"scale_to needs a Schedule, got {type(schedule).__name__}")
    return schedule.rescaled(total_steps)


def by_name(name: str, total_steps: int, *, target_bits: float = PAPER_TARGET_BITS,
            start_bits: float = 8.0) -> Schedule:
    """A named schedule over ``total_steps`` steps ending at ``target_bits``.

    Names: ``fraqat``, ``integer``, ``simple`` (the paper's staircases, scaled), ``nested``,
    ``early``, ``nested_early`` (candidates, scaled), ``constant`` (vanilla QAT at
    ``target_bits``), ``linear`` and ``cosine`` (from ``start_bits``, over the whole run), and
    ``linear:F`` / ``cosine:F`` (over the first fraction ``F`` of it, then ``target_bits``).
    """
    total = _check_steps(total_steps, "total_steps")
    name, fraction = parse_name(name)
    staircases = {"fraqat": fraqat, "integer": integer, "simple": simple, "nested": nested, "early": early,
                  "nested_early": nested_early}
    if name in staircases:
        return scale_to(staircases[name](target_bits=target_bits), total)
    if name == "constant":
        return constant(target_bits, total)
    if name == "linear":
        return linear(start_bits, target_bits, total, fraction)
    return cosine(start_bits, target_bits, total, fraction)
