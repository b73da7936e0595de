"""The jitted FraQAT distillation step.

``make_train_step`` returns ``step_fn(train_state, teacher_state, student_rest, batch) ->
(train_state, metrics)``, a ``jax.jit`` of a pure function (NNX used functionally: the graph
definitions are split once, ``nnx.merge`` runs inside the step; the seed is an argument, not a
compiled-in constant, see :class:`SeededStep`). Inside one call:

1. ``bits = schedule(step)`` (a traced scalar: no recompilation when it changes), set on the student
   (``set_bits``), and the layers with their own schedule (``layer_schedules``) at theirs
   (``apply_schedules``);
2. the family's training inputs (``Family.training_inputs``) are drawn from ``fold_in(key(seed),
   step)``, so a resumed run sees the same inputs as an uninterrupted one;
3. the teacher's output under ``stop_gradient``, the student's output (``Family.apply``), and the
   family's distillation loss (``Family.loss``);
4. gradients (averaged over ``grad_accum`` micro-batches by ``lax.scan``), clipping, AdamW, EMA.

``train_state`` is a dict ``{"params", "opt_state", "ema", "step"}``; ``step`` counts updates done.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fraqat_jax.family import family_named
from fraqat_jax.nn import apply_schedules, prequantized, set_bits

__all__ = ["SeededStep", "make_train_step"]


def make_train_step(cfg, *, schedule, teacher_graph, student_graph, family, tx: optax.GradientTransformation,
                    lr_schedule: Callable, shardings=None, donate: bool = True):
    """Builds the jitted step (see the module docstring). ``family``: the run's
    :class:`fraqat_jax.family.Family` (or its name). ``shardings``: optional
    ``(train_state, teacher_state, student_rest, batch)`` in-shardings; outputs keep the state's."""
    # The key's raw data (uint32[2]) as an argument: any int seed, the same key as key(cfg.seed).
    if isinstance(family, str):
        family = family_named(family)
    seed = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    accum = int(cfg.grad_accum)
    ema_decay = float(cfg.ema_decay)

    def make_micro_loss(graph):
        def micro_loss(params, rest, teacher_state, bits, step, inputs):
            teacher = nnx.merge(teacher_graph, teacher_state)
            target = jax.lax.stop_gradient(family.apply(teacher, inputs))
            student = nnx.merge(graph, params, rest)
            set_bits(student, bits)
            apply_schedules(student, step)
            return family.loss(family.apply(student, inputs), target, inputs)

        return micro_loss

    grad_fn = jax.value_and_grad(make_micro_loss(student_graph))

    def step_fn(train_state, teacher_state, student_rest, batch, seed):
        step = train_state["step"]
        bits = schedule(step)
        key = jax.random.fold_in(jax.random.wrap_key_data(seed), step)
        inputs = family.training_inputs(key, batch, cfg)
        params = train_state["params"]
        if accum == 1:
            loss, grads = grad_fn(params, student_rest, teacher_state, bits, step, inputs)
        else:
            # Micro-batch a takes rows a, a + accum, ...: each device keeps its own rows.
            def split(v):
                v = v.reshape(v.shape[0] // accum, accum, *v.shape[1:])
                return jnp.moveaxis(v, 1, 0)

            micro = jax.tree.map(split, inputs)
            # The weights are fake-quantized once per step, not once per micro-batch: the gradient
            # with respect to a quantized kernel is the kernel's (straight-through estimator).
            student = nnx.merge(student_graph, params, student_rest)
            set_bits(student, bits)
            apply_schedules(student, step)
            q_graph, q_params, q_rest = nnx.split(prequantized(student), nnx.Param, ...)
            q_params, q_rest = nnx.to_pure_dict(q_params), nnx.to_pure_dict(q_rest)
            q_grad_fn = jax.value_and_grad(make_micro_loss(q_graph))

            def body(carry, mb):
                loss_sum, grad_sum = carry
                l, g = q_grad_fn(q_params, q_rest, teacher_state, bits, step, mb)
                return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

            zeros = jax.tree.map(jnp.zeros_like, q_params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, train_state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ema = train_state["ema"]
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, new_params)
        new_state = {"params": new_params, "opt_state": opt_state, "ema": ema, "step": step + 1}
        metrics = {"loss": loss, "bits": bits, "lr": jnp.asarray(lr_schedule(step), jnp.float32), "grad_norm": grad_norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return new_state, metrics

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if shardings is not None:
        kwargs["in_shardings"] = (*shardings, None)
        kwargs["out_shardings"] = (shardings[0], None)
    return SeededStep(jax.jit(step_fn, **kwargs), seed)


class SeededStep:
    """The jitted step with the run's seed (its key's data) passed as an argument rather than baked
    in as a constant, so runs that differ only in seed (``compare``'s paired seeds) lower to the
    same program and share it through JAX's persistent compilation cache. It is called, lowered
    and compiled like the jitted function, with the first four arguments; ``lower(...).compile()``
    gives a callable that keeps the compiled object's attributes (``memory_analysis``, ...)."""

    def __init__(self, inner, seed):
        self.inner, self.seed = inner, seed

    def __call__(self, *args):
        return self.inner(*args, self.seed)

    def lower(self, *args):
        return SeededStep(self.inner.lower(*args, self.seed), self.seed)

    def compile(self, *args, **kwargs):
        return SeededStep(self.inner.compile(*args, **kwargs), self.seed)

    def __getattr__(self, name):
        return getattr(self.inner, name)
