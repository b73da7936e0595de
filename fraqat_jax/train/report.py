"""What the user sees: progress bar or log lines, metrics.jsonl, TensorBoard (the samples are the family's)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = ["MetricsLog", "Progress"]


def _kept(line: str, start_step: int) -> bool:
    """A row to keep on resume: complete (a process killed mid-write can leave a torn last line) and
    not past the restored step; event rows (no ``step`` or one at/below it) are kept."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and row.get("step", 0) <= start_step


class MetricsLog:
    """``metrics.jsonl`` (one row per logged step, flushed as written) and TensorBoard scalars.

    On resume from step ``start``, rows with ``step > start`` (work lost by the interruption, about
    to be redone) are dropped and new rows are appended after the rest of the history.
    """

    def __init__(self, workdir: str, start_step: int, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if _kept(line, start_step)]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and "event" not in row and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


class Progress:
    """A rich progress bar on a terminal (mode ``bar``), plain lines otherwise (``log``), or nothing."""

    def __init__(self, total: int, start: int, mode: str = "auto", *, enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode if enabled else "none"
        self.enabled = enabled
        self.total, self.t0 = total, time.perf_counter()
        self.start = start
        self.bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]FraQAT"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("bits {task.fields[bits]:.2f}  loss {task.fields[loss]:.4g}  "
                                               "{task.fields[rate]:.1f} it/s"),
                                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    transient=False)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, bits=0.0, loss=float("nan"), rate=0.0)

    def update(self, step: int, bits: float, loss: float, rate: float, row: dict | None) -> None:
        if self.mode == "bar":
            self.bar.update(self.task, completed=step, bits=bits, loss=loss, rate=rate)
        elif self.mode == "log" and row is not None:
            done = step - self.start
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  bits {bits:.2f}  loss {loss:.5g}  lr {row['lr']:.3g}  "
                  f"{row['steps_per_sec']:.1f} it/s  eta {eta:.0f}s", flush=True)

    def message(self, text: str) -> None:
        """Important events (resume, preemption, NaN) are printed in every mode but by one process."""
        if self.mode == "bar":
            self.bar.console.print(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
