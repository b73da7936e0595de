"""The training run: models, mesh, data, checkpoints, the loop, signals, outputs (see the package doc)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fraqat_jax import schedules
from fraqat_jax.train import checkpoint as ckpt_lib
from fraqat_jax.train import mesh as mesh_lib
from fraqat_jax.train.config import ConfigError, load_config
from fraqat_jax.train.models import apply_model, family_of, load_teacher, make_student, objective_of, set_student_bits
from fraqat_jax.train.report import MetricsLog, Progress, save_grid
from fraqat_jax.train.step import make_lr_schedule, make_optimizer, make_train_step

__all__ = ["RunResult", "TrainingDiverged", "build_models", "load_run", "run"]

DEFAULT_WORKDIR = os.path.join("runs", "default")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    workdir: str
    steps: int
    final_loss: float
    final_bits: float
    metrics: list
    status: str  # "completed" | "preempted" | "nan"
    seconds: float = 0.0
    compilations: int = 0


def _as_config(config) -> ml_collections.ConfigDict:
    if config is None:
        return load_config()
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return load_config(base=config)


def build_models(config):
    """``(teacher, student)``: the config's teacher and a freshly quantized copy of it."""
    cfg = _as_config(config)
    teacher = load_teacher(cfg)
    return teacher, make_student(teacher, cfg)


def make_schedule(cfg) -> schedules.Schedule:
    return schedules.by_name(cfg.schedule, int(cfg.steps), target_bits=float(cfg.target_bits),
                             start_bits=float(cfg.start_bits))


# ----------------------------------------------------------------------------- state plumbing


def _flat_names(state) -> dict:
    """Nested pure dict of NamedSharding-spec inputs: {path: (shape, names)} for an nnx.State."""
    out = {}
    for path, v in nnx.to_flat_state(state):
        value = v.get_value() if hasattr(v, "get_value") else v.value
        out[path] = (np.shape(value), mesh_lib._names_of(v))
    return out


def _nest(flat: Mapping[tuple, Any]) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return root


def state_shardings(state, mesh) -> dict:
    """A pure dict (like ``nnx.to_pure_dict(state)``) of NamedShardings by logical-axis rules."""
    return _nest({path: NamedSharding(mesh, mesh_lib.param_spec(shape, names, mesh))
                  for path, (shape, names) in _flat_names(state).items()})


def _put(tree, shardings):
    """Global arrays from host values that are identical on every process."""
    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def _global_batch(local: Mapping[str, np.ndarray], mesh) -> dict:
    return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


class _StopFlag:
    """SIGTERM / SIGINT ask for a save at the next step boundary; a second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- data


def _make_data(cfg, teacher_config: Mapping, family, image_size, sampler_for_datafree):
    from fraqat_jax import data

    if cfg.data == "datafree":
        if family != "dit":
            raise ConfigError(f"data=datafree needs a class-conditional DiT teacher, got a {family} teacher "
                              "(text-to-image teachers need cached text embeddings: data=latents:DIR)")
        c = int(teacher_config.get("in_channels", 4))
        spec = {"latents": ((c, image_size, image_size), np.dtype(np.float32)), "class_labels": ((), np.dtype(np.int32))}
        return data.DataFreeSource(sampler_for_datafree, spec, seed=cfg.seed + 1)
    return data.make_source(cfg.data, seed=cfg.seed, image_size=image_size, data_dir=cfg.data_dir or None)


# ----------------------------------------------------------------------------- sampling


def _num_classes(teacher) -> int | None:
    n = teacher.config.get("num_embeds_ada_norm")
    return int(n) if n else None


def _make_samplers(cfg, family, teacher_graph, student_graph, mesh):
    """Jitted ``teacher_sample(state, noise, cond, key)`` and ``student_sample((params, rest, bits), ...)``."""
    from fraqat_jax.eval import samplers

    kind = "ddim" if objective_of(family) == "ddpm" else "euler"
    scale = 1000.0 if family == "flux" else 1.0  # flux takes sigma, the samplers give 1000 * sigma

    def teacher_apply(state, x, t, cond):
        return apply_model(nnx.merge(teacher_graph, state), family, x, t / scale, cond)

    def student_apply(params, x, t, cond):
        p, rest, bits = params
        student = nnx.merge(student_graph, p, rest)
        set_student_bits(student, bits)
        return apply_model(student, family, x, t / scale, cond)

    extra = {"num_steps": int(cfg.sample_steps)}
    if cfg.guidance_scale != 1.0:
        extra["guidance_scale"] = float(cfg.guidance_scale)
    repl = mesh_lib.replicated(mesh)

    def wrap(apply):
        inner = samplers.make_sampler(kind, apply, **extra) if "guidance_scale" not in extra else None

        def call(params, noise, cond, key, null_cond=None):
            if inner is not None:
                return inner(params, noise, cond, key)
            fn = lambda x, t, c: apply(params, x, t, c)  # noqa: E731
            return samplers.sample(kind, fn, noise, cond, key=key if kind != "euler" else None,
                                   null_cond=null_cond, **extra)

        return jax.jit(call, out_shardings=repl)

    return wrap(teacher_apply), wrap(student_apply)


# ----------------------------------------------------------------------------- run


def run(config=None, *, workdir: str | None = None) -> RunResult:
    """Trains a FraQAT student (see the package docstring). ``config``: ConfigDict, dict or None."""
    cfg = _as_config(config)
    workdir = os.path.abspath(workdir or DEFAULT_WORKDIR)
    is_main = jax.process_index() == 0
    try:
        mesh = mesh_lib.build_mesh(cfg.mesh)
    except mesh_lib.MeshError as e:
        raise ConfigError(str(e)) from None
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    schedule = make_schedule(cfg)
    teacher = load_teacher(cfg)
    family = family_of(teacher)
    student = make_student(teacher, cfg)
    image_size = int(cfg.image_size or teacher.config.get("sample_size", 8))

    teacher_graph, teacher_state_v = nnx.split(teacher)
    student_graph, params_v, rest_v = nnx.split(student, nnx.Param, ...)
    teacher_sh = state_shardings(teacher_state_v, mesh)
    params_sh = state_shardings(params_v, mesh)
    rest_sh = state_shardings(rest_v, mesh)
    teacher_state = _put(nnx.to_pure_dict(teacher_state_v), teacher_sh)
    params = _put(nnx.to_pure_dict(params_v), params_sh)
    rest = _put(nnx.to_pure_dict(rest_v), rest_sh)
    del teacher, student, teacher_state_v, params_v, rest_v

    tx = make_optimizer(cfg)
    lr_schedule = make_lr_schedule(cfg)
    repl = mesh_lib.replicated(mesh)
    import optax

    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, params_sh,
                                   transform_non_params=lambda _: repl)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    ema_on = cfg.ema_decay > 0
    state_sh = {"params": params_sh, "opt_state": opt_sh, "ema": params_sh if ema_on else None, "step": repl}
    train_state = {"params": params, "opt_state": opt_state,
                   "ema": jax.tree.map(jnp.copy, params) if ema_on else None,
                   "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}

    ckpt = ckpt_lib.Checkpointer(workdir, int(cfg.keep_checkpoints))
    start, position = 0, 0
    latest = ckpt.latest_step()
    if latest is not None:
        train_state, meta = ckpt.restore(latest, ckpt_lib.abstract_like(train_state, state_sh))
        start, position = int(meta["step"]), int(meta["data_position"])
    total = int(cfg.steps)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)

    step_fn = make_train_step(cfg, schedule=schedule, teacher_graph=teacher_graph, student_graph=student_graph,
                              family=family, tx=tx, lr_schedule=lr_schedule,
                              shardings=(state_sh, teacher_sh, rest_sh, None))

    teacher_sample = student_sample = None
    num_classes = _num_classes(nnx.merge(teacher_graph, teacher_state)) if family == "dit" else None

    def datafree_generate(key, n):
        k_noise, k_labels, k_step = jax.random.split(key, 3)
        c = spec_c
        noise = jax.random.normal(k_noise, (n, c, image_size, image_size), jnp.float32)
        labels = jax.random.randint(k_labels, (n,), 0, num_classes)
        x0 = teacher_sample(teacher_state, noise, {"class_labels": labels}, k_step)
        return {"latents": x0, "class_labels": labels}

    graph_cfg = nnx.merge(teacher_graph, teacher_state).config
    spec_c = int(graph_cfg.get("in_channels", 4))
    if cfg.sample_grids or cfg.data == "datafree":
        teacher_sample, student_sample = _make_samplers(cfg, family, teacher_graph, student_graph, mesh)
    source = _make_data(cfg, graph_cfg, family, image_size, datafree_generate)
    host, hosts = jax.process_index(), jax.process_count()
    if cfg.batch_size % hosts:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {hosts} processes")
    n_batch_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % n_batch_dev:
        raise ConfigError(f"batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} is not divisible by the "
                          f"{n_batch_dev} devices on the data and fsdp mesh axes")

    # Sampling set-up for the grids: fixed noise and conditioning, teacher samples computed once.
    grid_inputs = None
    if cfg.sample_grids:
        n = int(cfg.num_samples)
        k_init, k_steps = jax.random.split(jax.random.key(cfg.seed + 2))
        noise = jax.device_put(jax.random.normal(k_init, (n, spec_c, image_size, image_size), jnp.float32), repl)
        if family == "dit":
            cond = {"class_labels": jnp.arange(n, dtype=jnp.int32) % (num_classes or 1)}
        else:
            first = source.batch(0, n)
            cond = {k: jnp.asarray(v) for k, v in first.items() if k != "latents"}
        cond = jax.device_put(cond, repl)
        null = {"class_labels": jnp.int32(num_classes)} if family == "dit" and num_classes else None
        grid_inputs = (noise, cond, k_steps, null)
        teacher_grid = None

    log = MetricsLog(workdir, start, enabled=is_main)
    progress = Progress(total, start, cfg.progress, enabled=is_main)
    if start:
        progress.message(f"resumed from {ckpt.directory}/{start} (data position {position})")
    rows, status, last_loss, last_bits = [], "completed", float("nan"), float(schedule(max(start - 1, 0)))
    window_t, window_n = time.perf_counter(), 0
    t_run = time.perf_counter()
    bits_values = schedule.values(total)

    def save(step_done):
        meta = {"step": step_done, "data_position": position, "config": cfg.to_dict(),
                "bits": float(bits_values[step_done - 1]) if step_done else None}
        ckpt.save(step_done, train_state, meta)

    with _StopFlag() as stop:
        try:
            for step in range(start, total):
                local = source.batch(position, int(cfg.batch_size), host_index=host, host_count=hosts)
                batch = _global_batch(local, mesh)
                train_state, metrics = step_fn(train_state, teacher_state, rest, batch)
                loss = float(metrics["loss"])
                bits = float(metrics["bits"])
                done = step + 1
                window_n += 1
                if not math.isfinite(loss):
                    status = "nan"
                    progress.message(f"loss is {loss} at step {done} (bits {bits}); stopping. The last good "
                                     f"checkpoint is kept in {ckpt.directory} (step {ckpt.latest_step()}).")
                    break
                position += 1
                last_loss, last_bits = loss, bits
                row = None
                if done % cfg.log_every == 0 or done == total:
                    now = time.perf_counter()
                    row = {"step": done, "bits": bits, "loss": loss, "lr": float(metrics["lr"]),
                           "grad_norm": float(metrics["grad_norm"]), "steps_per_sec": window_n / (now - window_t),
                           "data_position": position}
                    window_t, window_n = now, 0
                    log.write(row)
                    rows.append(row)
                progress.update(done, bits, loss, rows[-1]["steps_per_sec"] if rows else 0.0, row)
                stage_end = done == total or bits_values[min(done, total - 1)] != bits
                if cfg.sample_grids and stage_end:
                    noise, cond, k_steps, null = grid_inputs
                    if teacher_grid is None:
                        teacher_grid = np.asarray(teacher_sample(teacher_state, noise, cond, k_steps, null))
                    s = np.asarray(student_sample((train_state["params"], rest, jnp.float32(bits)), noise, cond,
                                                  k_steps, null))
                    if is_main:
                        path = os.path.join(workdir, "samples", f"step_{done:06d}_bits_{bits:g}.png")
                        image = save_grid(path, [teacher_grid, s])
                        log.add_image("samples/teacher_top_student_bottom", image, done)
                if stop.signum is not None or done % cfg.checkpoint_every == 0 or done == total:
                    save(done)
                if stop.signum is not None:
                    status = "preempted"
                    progress.message(f"{signal.Signals(stop.signum).name} received: saved step {done} to "
                                     f"{ckpt.directory}; run the same command again to resume")
                    break
        finally:
            progress.close()
            log.close()
            ckpt.close()

    seconds = time.perf_counter() - t_run
    done_steps = int(jax.device_get(train_state["step"])) if status != "nan" else (rows[-1]["step"] if rows else start)
    result = RunResult(workdir=workdir, steps=done_steps, final_loss=last_loss, final_bits=last_bits, metrics=rows,
                       status=status, seconds=seconds, compilations=_cache_size(step_fn))
    if is_main:
        summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "metrics"}
        summary.update(schedule=cfg.schedule, total_steps=total,
                       stage_losses=_stage_losses(rows))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if status == "nan":
        raise TrainingDiverged(f"loss became non-finite; last good checkpoint kept in {os.path.join(workdir, 'checkpoints')}")
    return result


def _stage_losses(rows):
    out = {}
    for r in rows:
        out[f"{r['bits']:g}"] = r["loss"]  # last logged loss of each bit-width
    return out


def _cache_size(fn) -> int:
    try:
        return int(fn._cache_size())
    except Exception:  # private API; report 0 when unavailable
        return 0


# ----------------------------------------------------------------------------- loading a run


def load_run(workdir: str, *, step: int | None = None, ema: bool = False):
    """``(teacher, student, config)`` from a run's workdir (see the package docstring)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} is not a run directory (no config.json)")
    with open(path) as f:
        cfg = load_config(base=json.load(f))
    cfg.unlock()
    cfg.mesh = ""
    cfg.lock()
    teacher = load_teacher(cfg)
    student = make_student(teacher, cfg)
    graph, params_v, rest_v = nnx.split(student, nnx.Param, ...)
    ckpt = ckpt_lib.Checkpointer(workdir, int(cfg.keep_checkpoints))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{workdir!r} holds no checkpoint")
    params = nnx.to_pure_dict(params_v)
    tx = make_optimizer(cfg)
    target = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
              "ema": params if cfg.ema_decay > 0 else None, "step": jnp.zeros((), jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
    state, meta = ckpt.restore(step, abstract)
    ckpt.close()
    if ema and state["ema"] is None:
        raise ValueError(f"run {workdir!r} kept no EMA (ema_decay=0)")
    chosen = state["ema"] if ema else state["params"]
    student = nnx.merge(graph, chosen, rest_v)
    bits = float(make_schedule(cfg)(max(int(meta["step"]) - 1, 0)))
    if cfg.quant_rules != "none":
        set_student_bits(student, bits)
    return teacher, student, cfg
