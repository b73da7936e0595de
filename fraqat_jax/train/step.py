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

from fraqat_jax import schedules
from fraqat_jax.family import families
from fraqat_jax.nn import apply_schedules, prequantized, set_bits

__all__ = ["SeededStep", "make_lr_schedule", "make_optimizer", "make_schedule", "make_train_step"]


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


def make_train_step(cfg, *, schedule, teacher_graph, student_graph, family, tx: optax.GradientTransformation,
                    lr_schedule: Callable, shardings=None, donate: bool = True):
    """Builds the jitted step (see the module docstring). ``family``: the run's
    :class:`fraqat_jax.family.Family` (or its name). ``shardings``: optional
    ``(train_state, teacher_state, student_rest, batch)`` in-shardings; outputs keep the state's."""
    if isinstance(family, str):  # a family's name: "dit", "sd3", ...
        family = families()[family]
    # The key's raw data (uint32[2]) as an argument: any int seed, the same key as key(cfg.seed).
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
