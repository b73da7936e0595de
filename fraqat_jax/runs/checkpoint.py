"""orbax checkpoints of the train state: student params, optimizer state, EMA, step, data position, config,
and the student's other state (bit-widths at the saved step, activation ranges).

orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only
once every file is written, so a process killed mid-save leaves a temporary folder and never a
half-written ``<step>``. :class:`Checkpointer` lists such leftovers in ``partial`` and removes them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "OLD_NAMES", "abstract_like", "checkpoint_steps", "renamed_keys"]

_TMP_MARK = ".orbax-checkpoint-tmp"


#: Names in the student's state that were renamed: today's name -> the name older checkpoints hold.
OLD_NAMES = {"weight_bits": "bits"}


def renamed_keys(tree: Any, names: Mapping[str, str]) -> Any:
    """``tree`` (nested dicts) with every dict key in ``names`` replaced by its value."""
    if isinstance(tree, Mapping):
        return {names.get(k, k): renamed_keys(v, names) for k, v in tree.items()}
    return tree


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in ``workdir/checkpoints``, ascending (``[]`` when none)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


class Checkpointer:
    """``WORKDIR/checkpoints/<step>/{state, meta}``; the last ``keep`` are kept."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.partial = self._remove_partial()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "rest", "meta"))

    def _remove_partial(self) -> list[str]:
        """Temporary folders of interrupted saves (removed by the first process)."""
        if not os.path.isdir(self.directory):
            return []
        found = sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory) if _TMP_MARK in n)
        if jax.process_index() == 0:
            for path in found:
                shutil.rmtree(path, ignore_errors=True)
        return found

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, rest: Any, meta: dict) -> None:
        """``state``: the train state; ``rest``: the student's other state (bit-widths, activation
        ranges: a static run's calibrated ranges travel with its weights). An unquantized student has
        no such state: an empty ``rest`` is not written (orbax refuses empty items)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if jax.tree.leaves(rest):
            items["rest"] = ocp.args.StandardSave(rest)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, abstract_rest: Any) -> tuple[Any, Any, dict]:
        """``(state, rest, meta)`` of checkpoint ``step``. A checkpoint written before the layers'
        weight bit-width was named ``weight_bits`` holds it as ``bits``: it is read under that name
        and handed back under today's."""
        def attempt(rest_target):
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if jax.tree.leaves(rest_target):
                items["rest"] = ocp.args.StandardRestore(rest_target)
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
            return out["state"], out["rest"] if "rest" in items else rest_target, out["meta"]

        try:
            return attempt(abstract_rest)
        except Exception:
            old = renamed_keys(abstract_rest, OLD_NAMES)
            if old == abstract_rest:
                raise
            try:
                state, rest, meta = attempt(old)
            except Exception:  # not an old checkpoint either: the first error is the one to report
                pass
            else:
                return state, renamed_keys(rest, {v: k for k, v in OLD_NAMES.items()}), meta
            raise

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with shardings) describing ``tree``, the restore target."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
