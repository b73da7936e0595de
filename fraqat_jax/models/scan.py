"""Scan over layers: a port's repeated blocks with their state stacked on a leading axis.

With ``scan_layers=True`` a port keeps its block list (e.g. ``transformer_blocks``) as a
:class:`ScannedBlocks`: consecutive blocks of one structure (same graph, same static attributes)
form a :class:`BlockStack` whose single block holds every variable with a leading ``[length]``
axis, and the forward pass runs it with ``jax.lax.scan``. The program then contains one block
body per stack instead of one per block, so compile time and host memory stop growing with depth
(MaxText's ``scan_layers``). SD3.5-Medium's 24 blocks form three stacks (13 dual-attention
blocks, 10 plain ones, the ``context_pre_only`` last block); DiT, PixArt, Sana and each of
Flux's two lists form one.

Names. State paths inside a stack read ``transformer_blocks.stacks.1.block.attn.to_q.kernel``
(kernel ``[length, in, out]``); checkpoints and diffusers files keep per-block names
(``transformer_blocks.13.attn.to_q.kernel``): :func:`unstack_flat` / :func:`restack_flat` convert
a flat state at that boundary, :func:`unscan` turns a scanned model into the unscanned one in place.

Stacking copies the states of blocks built one by one, so a scanned model and an unscanned one
built from the same ``rngs`` hold the same numbers. Every variable under a stack, including
quantizer state added later (bit-widths, activation ranges), carries the leading axis, so a
scanned quantized layer still has one bit-width and one scale set per block.

Remat. ``remat`` is False, True (``jax.checkpoint`` of each block: only its inputs are saved for
the backward pass) or the name of a ``jax.checkpoint_policies`` policy without arguments
(``"dots_with_no_batch_dims_saveable"`` also saves the matmul outputs: less recomputation, more
memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: ``remat`` values besides True/False: policies of ``jax.checkpoint_policies`` taking no arguments.
REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)

Step = Callable[..., Any]


def check_remat(remat: Any) -> bool | str:
    """Validates a port's ``remat`` argument (False, True or a name in ``REMAT_POLICIES``)."""
    if isinstance(remat, bool) or remat in REMAT_POLICIES:
        return remat
    raise ValueError(f"remat={remat!r} is not allowed: use False, True or one of {REMAT_POLICIES}")


def checkpointed(fn: Callable, remat: bool | str, *, prevent_cse: bool = True) -> Callable:
    """``fn`` under ``jax.checkpoint`` with the policy ``remat`` names (``fn`` itself when False)."""
    if remat is False:
        return fn
    policy = None if remat is True else getattr(jax.checkpoint_policies, remat)
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def _stack_variable(*variables: nnx.Variable) -> nnx.Variable:
    first = variables[0]
    value = jnp.stack([v.get_value() for v in variables])
    names = first.get_metadata().get("out_sharding")
    if names is None:
        return first.replace(value)
    # The layer axis is never sharded: each chip holds its slice of every block (FSDP/tensor).
    return first.replace(value, out_sharding=(None, *names))


def _slice_variable(variable: nnx.Variable, index: int) -> nnx.Variable:
    value = variable.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape)
        value = jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=None)
    else:
        value = value[index]
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        return variable.replace(value)
    return variable.replace(value, out_sharding=tuple(names)[1:])


class BlockStack(nnx.Module):
    """Blocks ``start .. start + length - 1`` of a diffusers block list, all of one structure, as
    one block (``block``) whose every variable has a leading ``[length]`` axis.

    ``blocks``: the built blocks (their values are copied; the list can be dropped afterwards).
    """

    def __init__(self, blocks: Sequence[nnx.Module], start: int):
        graphdef, first = nnx.split(blocks[0])
        states = [first]
        for i, block in enumerate(blocks[1:], start=1):
            other_graph, state = nnx.split(block)
            if other_graph != graphdef:
                raise ValueError(f"block {start + i} differs in structure from block {start}: cannot stack them")
            states.append(state)
        is_var = lambda x: isinstance(x, nnx.Variable)
        stacked = jax.tree.map(_stack_variable, *states, is_leaf=is_var)
        self.block = nnx.merge(graphdef, stacked)
        self.start = start
        self.length = len(blocks)

    def layer(self, index: int) -> nnx.Module:
        """Block ``start + index`` as a module of its own (a copy: writes to it do not reach the stack)."""
        graphdef, state = nnx.split(self.block)
        return nnx.merge(graphdef, jax.tree.map(lambda v: _slice_variable(v, index), state,
                                                is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def run(self, step: Step, carry: Any, consts: tuple, remat: bool | str, skip: Sequence[int] = ()) -> Any:
        """``carry = step(block_i, carry, *consts)`` for each block of the stack (``jax.lax.scan``).

        ``skip``: list indices (as in diffusers) of blocks to leave out; the carry passes them
        unchanged. A stack of one block is called directly (its carry may change structure, e.g.
        SD3's last block returns no context)."""
        skipped = [i - self.start for i in skip if self.start <= i < self.start + self.length]
        if self.length == 1:
            if skipped:
                return carry
            return _call_pure(self.layer(0), step, carry, consts, remat)
        graphdef, state = nnx.split(self.block)
        flags = jnp.asarray(np.isin(np.arange(self.length), skipped)) if skipped else None

        def body(carry, xs):
            layer_state, skip_flag = xs
            new = step(nnx.merge(graphdef, layer_state), carry, *consts)
            if skip_flag is not None:
                new = jax.tree.map(lambda old, upd: jnp.where(skip_flag, old, upd), carry, new)
            return new, None

        # prevent_cse=False: scan already keeps the recomputation from being merged away.
        body = checkpointed(body, remat, prevent_cse=False)
        carry, _ = jax.lax.scan(body, carry, (state, flags))
        return carry


class ScannedBlocks(nnx.Module):
    """A diffusers block list (``nn.ModuleList``) run with ``jax.lax.scan``: maximal runs of
    consecutive same-structure blocks each form one :class:`BlockStack` in ``stacks``.

    ``len()`` and ``[i]`` behave as on the block list; ``[i]`` returns a copy of block ``i``.
    """

    def __init__(self, blocks: Sequence[nnx.Module]):
        if not blocks:
            raise ValueError("ScannedBlocks needs at least one block")
        graphs = [nnx.graphdef(b) for b in blocks]
        stacks, start = [], 0
        for i in range(1, len(blocks) + 1):
            if i == len(blocks) or graphs[i] != graphs[start]:
                stacks.append(BlockStack(blocks[start:i], start))
                start = i
        self.stacks = nnx.List(stacks)
        self.length = len(blocks)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> nnx.Module:
        if not -self.length <= index < self.length:
            raise IndexError(f"block index {index} out of range for {self.length} blocks")
        index %= self.length
        for stack in self.stacks:
            if index < stack.start + stack.length:
                return stack.layer(index - stack.start)
        raise AssertionError("unreachable")

    def __iter__(self):
        return (self[i] for i in range(self.length))


def block_list(blocks: Sequence[nnx.Module], scan_layers: bool) -> nnx.List | ScannedBlocks:
    """A port's block list: stacked for ``jax.lax.scan`` when ``scan_layers``, else an ``nnx.List``."""
    return ScannedBlocks(blocks) if scan_layers else nnx.List(list(blocks))


def run_blocks(blocks: nnx.List | ScannedBlocks, step: Step, carry: Any, *consts: Any,
               remat: bool | str = False, skip: Sequence[int] = ()) -> Any:
    """Runs a block list: ``carry = step(block, carry, *consts)`` for each block in order.

    ``step`` adapts the block's call to a carry (e.g. ``lambda b, x, t: b(x, t)``) and holds
    Python constants (token grid sizes) in its closure; ``consts`` are arrays (or None) every
    block receives. ``remat``: see the module docstring. ``skip``: block indices to leave out.

    Unscanned blocks are called one by one; the rematerialised call is a pure function of the
    block's state (split/merge around ``jax.checkpoint``), so it also works when the parameters
    are closed over by an inner transform (a frozen teacher inside ``jax.grad`` over the student),
    where ``nnx.remat`` would write state back across trace levels. Scanned stacks are called the
    same way, their state passed to ``jax.lax.scan`` as the sequence scanned over."""
    remat = check_remat(remat)
    if isinstance(blocks, ScannedBlocks):
        for stack in blocks.stacks:
            carry = stack.run(step, carry, consts, remat, skip)
        return carry
    skip = set(skip)
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        carry = step(block, carry, *consts) if remat is False else _call_pure(block, step, carry, consts, remat)
    return carry


def _call_pure(block: nnx.Module, step: Step, carry: Any, consts: tuple, remat: bool | str) -> Any:
    """``step(block, carry, *consts)`` as a function of the block's state, under ``jax.checkpoint``."""
    graphdef, state = nnx.split(block)
    return checkpointed(lambda s, c, *a: step(nnx.merge(graphdef, s), c, *a), remat)(state, carry, *consts)


def stack_prefixes(model: nnx.Module) -> dict[tuple, tuple[tuple, int, int]]:
    """``{path of a stacked block: (path of its block list, start, length)}`` for every
    :class:`BlockStack` in ``model`` (e.g. ``("transformer_blocks", "stacks", 1, "block")`` ->
    ``(("transformer_blocks",), 13, 10)``)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, BlockStack):
            if len(path) < 2 or path[-2] != "stacks":
                raise ValueError(f"BlockStack at {path} is not inside a ScannedBlocks")
            out[tuple(path) + ("block",)] = (tuple(path[:-2]), node.start, node.length)
    return out


def _split_path(path: tuple, prefixes: dict) -> tuple[tuple, tuple] | None:
    for prefix in prefixes:
        if path[: len(prefix)] == prefix:
            return prefix, path[len(prefix):]
    return None


def unstack_flat(model: nnx.Module, flat: Sequence[tuple[tuple, nnx.Variable]]) -> list[tuple[tuple, nnx.Variable]]:
    """A flat state of ``model`` (``nnx.to_flat_state``) with per-block paths: each stacked
    variable ``[length, ...]`` becomes ``length`` variables named as in the unscanned model
    (``transformer_blocks.{start + i}.<rest>``). Abstract values (``ShapeDtypeStruct``) stay
    abstract. The inverse is :func:`restack_flat`."""
    prefixes = stack_prefixes(model)
    if not prefixes:
        return list(flat)
    out = []
    for path, var in flat:
        split = _split_path(tuple(path), prefixes)
        if split is None:
            out.append((tuple(path), var))
            continue
        prefix, rest = split
        list_path, start, length = prefixes[prefix]
        out.extend((list_path + (start + i,) + rest, _slice_variable(var, i)) for i in range(length))
    return out


def restack_flat(model: nnx.Module, flat: Sequence[tuple[tuple, nnx.Variable]]) -> list[tuple[tuple, nnx.Variable]]:
    """Inverse of :func:`unstack_flat`: per-block entries of ``model``'s stacks are stacked back
    (values ``jnp.stack``-ed, metadata from ``model``'s own stacked variables). Raises
    ``ValueError`` naming the missing per-block paths."""
    prefixes = stack_prefixes(model)
    if not prefixes:
        return list(flat)
    values = {tuple(p): v for p, v in flat}
    out = []
    for path, template in nnx.to_flat_state(nnx.state(model)):
        split = _split_path(tuple(path), prefixes)
        if split is None:
            out.append((tuple(path), values.pop(tuple(path))))
            continue
        prefix, rest = split
        list_path, start, length = prefixes[prefix]
        keys = [list_path + (start + i,) + rest for i in range(length)]
        missing = [".".join(map(str, k)) for k in keys if k not in values]
        if missing:
            raise ValueError(f"cannot restack {'.'.join(map(str, path))}: missing {', '.join(missing)}")
        parts = [values.pop(k).get_value() for k in keys]
        if isinstance(parts[0], jax.ShapeDtypeStruct):  # still abstract (e.g. quantizer state never loaded)
            out.append((tuple(path), template))
        else:
            out.append((tuple(path), template.replace(jnp.stack(parts))))
    return out


def unscan(model: nnx.Module) -> nnx.Module:
    """Replaces, in place, every :class:`ScannedBlocks` of ``model`` by the ``nnx.List`` of its
    blocks (the unscanned model: same values, per-block paths; quantizer state included), e.g.
    to calibrate or freeze per block. Returns ``model``."""
    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, ScannedBlocks)]
    for path, node in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        blocks = nnx.List([node[i] for i in range(len(node))])
        if isinstance(path[-1], int):
            parent[path[-1]] = blocks
        else:
            setattr(parent, path[-1], blocks)
    return model
