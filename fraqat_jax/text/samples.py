"""Text samples at each change of bit-width: the teacher's and the student's greedy continuations of
fixed prompts, written as ``samples/step_{step:06d}_bits_{bits:g}.txt``."""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["format_samples", "write_samples"]


def format_samples(step: int, bits: float, prompts: Sequence[str], teacher: Sequence[str],
                   student: Sequence[str]) -> str:
    """One block per prompt: the prompt, then the teacher's and the student's continuations."""
    lines = [f"step {step}, student weight bits {bits:g}: greedy continuations of {len(prompts)} fixed prompts "
             "(the first tokens of held-out windows)", ""]
    for i, (p, t, s) in enumerate(zip(prompts, teacher, student), 1):
        lines += [f"=== prompt {i} ===", p, "--- teacher ---", t, f"--- student ({bits:g}-bit weights) ---", s, ""]
    return "\n".join(lines)


def write_samples(path: str, step: int, bits: float, prompts: Sequence[str], teacher: Sequence[str],
                  student: Sequence[str]) -> str:
    """Writes :func:`format_samples` to ``path`` (folders created); returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_samples(step, bits, prompts, teacher, student))
    return path
