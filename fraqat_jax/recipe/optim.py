"""The run's optimizer and schedules: the weight bit-width schedule, the learning-rate schedule, AdamW."""

from __future__ import annotations

import numpy as np
import optax

from fraqat_jax import schedules

__all__ = ["make_lr_schedule", "make_optimizer", "make_schedule"]


def make_schedule(cfg) -> schedules.Schedule:
    """The run's weight bit-width schedule, scaled to ``cfg.steps``."""
    return schedules.by_name(cfg.schedule, int(cfg.steps), target_bits=float(cfg.target_bits),
                             start_bits=float(cfg.start_bits))


def _warmup_cosine(cfg, steps: int, warm: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0 if warm else cfg.lr, cfg.lr, warm, max(steps, warm + 1),
                                              end_value=cfg.lr * cfg.end_lr_fraction)


def make_lr_schedule(cfg) -> optax.Schedule:
    """``cfg.lr_schedule``: ``cosine`` (linear warmup over ``warmup_steps``, cosine decay to
    ``lr * end_lr_fraction`` at the last step), ``constant`` (warmup, then ``lr``), or ``restart``:
    one cosine decay per stage of the bit schedule (a staircase), the first after the warmup, each
    later one starting again at ``lr`` when the bits change (SGDR-style warm restarts; Adam's
    moments carry over). Vanilla QAT's one stage makes ``restart`` the same as ``cosine``."""
    total = int(cfg.steps)
    warm = min(int(cfg.warmup_steps), total - 1) if total > 1 else 0
    if cfg.lr_schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)], [warm])
    if cfg.lr_schedule == "restart":
        stages = make_schedule(cfg).stages
        if stages is None:  # config.validate refuses this combination
            raise ValueError(f"lr_schedule='restart' needs a staircase bit schedule, not schedule={cfg.schedule!r}")
        lengths = [n for _, n in stages]
        lengths[-1] = max(total - sum(lengths[:-1]), 1)
        parts = [_warmup_cosine(cfg, n, min(warm, n - 1) if i == 0 else 0) for i, n in enumerate(lengths)]
        return optax.join_schedules(parts, [int(b) for b in np.cumsum(lengths[:-1])])
    return _warmup_cosine(cfg, total, warm)


def make_optimizer(cfg) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(make_lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
