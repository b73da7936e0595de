"""The training run: build the state, resume, the loop, outputs (see the package docstring).

What a run guarantees (tested):
- Resuming: the newest *complete* checkpoint is restored (a save interrupted by ``kill -9`` leaves a
  temporary folder that is skipped and removed, with a message); data position and per-step keys are
  checkpointed, so losses and bits from there on equal an uninterrupted run's, and
  ``metrics.jsonl`` keeps exactly one row per logged step.
- A resume whose config differs from the checkpoint's refuses (``ConfigError``, exit 2) and names
  every differing key, except the keys in :data:`SAFE_ON_RESUME` (and ``steps`` when extending a
  finished run), which are recorded as an event row in ``metrics.jsonl``; ``force_resume`` overrides
  and is recorded the same way.
- No host sync per step: the step returns a finite-flag that stays on the device; the loop reads it
  at log, checkpoint and sample steps. A checkpoint is written only when every step since the last
  check was finite. On a non-finite loss the run stops (``TrainingDiverged``, exit 1) and keeps the
  last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
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

from fraqat_jax.data.streams import stream
from fraqat_jax.nn import apply_schedules, calibrate, set_bits
from fraqat_jax.parallel import mesh as mesh_lib
from fraqat_jax.recipe import state as state_lib
from fraqat_jax.recipe.config import ConfigError, get_config, load_config, upgrade_saved
from fraqat_jax.family import family_for_teacher
from fraqat_jax.recipe.models import load_teacher, make_student
from fraqat_jax.runs import checkpoint as ckpt_lib
from fraqat_jax.train.report import MetricsLog, Progress

__all__ = ["CheckpointWriteError", "RunResult", "SAFE_ON_RESUME", "TrainingDiverged", "build_models", "run"]

DEFAULT_WORKDIR = os.path.join("runs", "default")
CALIBRATION_SAMPLES = 100  # the paper's phone calibration
#: Config keys that may change when a run is resumed: they change what is written, not what is trained.
SAFE_ON_RESUME = ("log_every", "checkpoint_every", "keep_checkpoints", "progress", "sample_grids", "mesh")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is kept."""


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


# ----------------------------------------------------------------------------- checks before training


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` and probes that a file can be written there (``ConfigError`` if not)."""
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror or e}); choose another --workdir "
                          "or free space there") from None


def config_changes(saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, current value)}`` for every key whose value differs. A key the
    checkpoint predates counts as its default (what that run used); ``saved`` is in today's keys
    (``upgrade_saved``: no key of another family)."""
    defaults = get_config(family_for_teacher(cfg["teacher"]) if "teacher" in cfg else None).to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = sorted(set(saved) | set(cfg))
    return {k: (saved.get(k), cfg.get(k)) for k in keys if saved.get(k) != cfg.get(k)}


def check_resume(saved: Mapping[str, Any], cfg: Mapping[str, Any], done_steps: int, *, force: bool) -> dict:
    """The config changes a resume may make (see the module docstring); raises ``ConfigError`` otherwise."""
    changes = config_changes(saved, cfg)
    extending = ("steps" in changes and done_steps >= int(saved.get("steps", 0))
                 and int(cfg.get("steps", 0)) > int(saved.get("steps", 0)))
    refused = {k: v for k, v in changes.items() if k not in SAFE_ON_RESUME and not (k == "steps" and extending)}
    if refused and not force:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"the workdir's checkpoint was trained with another config ({listed}); use the same "
                          "config, another --workdir, or --force-resume to continue anyway")
    return changes


# ----------------------------------------------------------------------------- the run


class _Run:
    """One call of :func:`run`: set-up, resume, the loop and its outputs, one method each."""

    def __init__(self, cfg, workdir: str, force_resume: bool):
        self.cfg, self.workdir, self.force_resume = cfg, workdir, force_resume
        self.is_main = jax.process_index() == 0
        check_workdir(workdir)
        try:
            self.mesh = mesh_lib.build_mesh(cfg.mesh)
        except mesh_lib.MeshError as e:
            raise ConfigError(str(e)) from None
        self.setup = state_lib.build(cfg, self.mesh)
        self.total = int(cfg.steps)
        self.bits_values = self.setup.schedule.values(self.total)
        self.repl = mesh_lib.replicated(self.mesh)
        self._samplers()
        self.source = self._data()
        self._check_batch()
        self.ckpt = ckpt_lib.Checkpointer(workdir, int(cfg.keep_checkpoints))

    # -- set-up ---------------------------------------------------------------------------------

    def _samplers(self):
        s, cfg = self.setup, self.cfg
        self.sampling = s.family.can_sample
        if not self.sampling:  # a family that generates nothing: no sample files, no data-free data
            self.teacher_sample = self.student_sample = None
            return
        self.teacher_sample = s.family.teacher_sampler(cfg, lambda st: nnx.merge(s.teacher_graph, st),
                                                       out_shardings=self.repl)

        def student(p):
            params, rest, bits, step = p
            model = nnx.merge(s.student_graph, params, rest)
            set_bits(model, bits)
            apply_schedules(model, step)
            return model

        self.student_sample = s.family.teacher_sampler(cfg, student, out_shardings=self.repl)

    def _data(self):
        s = self.setup
        sample = (lambda prompts: self.teacher_sample(s.teacher_state, prompts)) if self.sampling else None
        return s.family.make_source(self.cfg, s.model_config, sample)

    def _check_batch(self):
        cfg, hosts = self.cfg, jax.process_count()
        if cfg.batch_size % hosts:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {hosts} processes")
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if (cfg.batch_size // cfg.grad_accum) % n_dev:
            raise ConfigError(f"batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} is not divisible by "
                              f"the {n_dev} devices on the data and fsdp mesh axes")

    def describe(self) -> str:
        """What will run: mesh, per-device batch, how parameters are sharded, state bytes per device."""
        s, cfg = self.setup, self.cfg
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        per_dev = cfg.batch_size // cfg.grad_accum // n_dev
        leaves = jax.tree.leaves(s.train_state["params"])
        sharded = sum(1 for x in leaves if not x.sharding.is_fully_replicated)
        state_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                          for x in jax.tree.leaves((s.train_state, s.teacher_state, s.rest)))
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        return (f"mesh {mesh} over {self.mesh.size} {jax.devices()[0].platform} device(s); batch {cfg.batch_size} = "
                f"{per_dev} per device x {n_dev} x grad_accum {cfg.grad_accum}; {sharded} of {len(leaves)} "
                f"student parameters sharded; teacher + student + optimizer state {state_bytes / 2**20:.1f} MiB "
                "per device")

    # -- resume ---------------------------------------------------------------------------------

    def resume(self, log_event) -> tuple[int, int]:
        """Restores the newest complete checkpoint; ``(start_step, data_position)``."""
        for path in self.ckpt.partial:
            log_event(None, f"skipped an incomplete checkpoint (interrupted save), removed it: {path}")
        latest = self.ckpt.latest_step()
        if latest is None:
            if self.cfg.act_ranges == "static" and self.cfg.quant_rules != "none":
                self.calibrate(log_event)
            return 0, 0
        meta = self.ckpt.restore_meta(latest)
        changes = check_resume(upgrade_saved(meta.get("config", {})), self.cfg.to_dict(), int(meta["step"]), force=self.force_resume)
        if changes:
            kind = "force_resume" if self.force_resume else "config_changed"
            log_event({"event": kind, "step": int(meta["step"]), "changes": {k: list(v) for k, v in changes.items()}},
                      f"resuming with config changes ({kind}): " + ", ".join(
                          f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        s = self.setup
        s.train_state, s.rest, meta = self.ckpt.restore(latest, ckpt_lib.abstract_like(s.train_state, s.state_sh),
                                                        ckpt_lib.abstract_like(s.rest, s.rest_sh))
        return int(meta["step"]), int(meta["data_position"])

    def calibrate(self, log_event) -> None:
        """Static activation ranges before the first step: ``CALIBRATION_SAMPLES`` examples of the run's
        data as training feeds them (``Family.calibration_inputs``), through the student at the
        schedule's first bit-width."""
        s, cfg = self.setup, self.cfg
        rows = self.source.batch(0, CALIBRATION_SAMPLES)
        batches = s.family.calibration_inputs(cfg, s.model_config, rows, jax.random.key(stream(cfg.seed, "calibration")),
                                              CALIBRATION_SAMPLES, 25)
        student = s.student(s.train_state["params"])
        set_bits(student, float(self.bits_values[0]))
        apply_schedules(student, 0)
        calibrate(student, batches, forward=s.family.apply)
        _, _, rest = nnx.split(student, nnx.Param, ...)
        s.rest = jax.device_put(nnx.to_pure_dict(rest), s.rest_sh)
        log_event(None, f"calibrated static activation ranges on {CALIBRATION_SAMPLES} examples (mean +/- 3 std, "
                        "integer zero points)")

    def saved_rest(self, step_done: int) -> dict:
        """The student's non-trainable state as the checkpoint stores it: its bit-widths those the
        schedule gave the last trained step (the step sets them on a copy inside ``jit``)."""
        s = self.setup
        student = s.student(s.train_state["params"])
        set_bits(student, float(self.bits_values[max(step_done - 1, 0)]))
        apply_schedules(student, max(step_done - 1, 0))
        return nnx.to_pure_dict(nnx.split(student, nnx.Param, ...)[2])

    def save(self, step_done: int, position: int) -> None:
        meta = {"step": step_done, "data_position": position, "config": self.cfg.to_dict()}
        try:
            self.ckpt.save(step_done, self.setup.train_state, self.saved_rest(step_done), meta)
        except Exception as e:  # disk full, permissions, ...: the previous checkpoint stays
            latest = self.ckpt.latest_step()
            kept = f"the previous checkpoint (step {latest}) is kept" if latest is not None else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint {step_done} to {self.ckpt.directory} "
                                       f"({type(e).__name__}: {' '.join(str(e).split())}); {kept}") from None

    # -- samples --------------------------------------------------------------------------------

    def sample_grid(self, done: int, bits: float, log: MetricsLog) -> None:
        """The family's samples of teacher and student from the same prompts, at a change of bit-width."""
        s = self.setup
        if not self.sampling:
            return
        if not hasattr(self, "_prompts"):
            prompts = s.family.sample_prompts(self.cfg, s.model_config, self.source, int(self.cfg.num_samples))
            self._prompts = jax.device_put(prompts, self.repl)
            self._teacher_samples = jax.device_get(self.teacher_sample(s.teacher_state, self._prompts))
        student = jax.device_get(self.student_sample(
            (s.train_state["params"], s.rest, jnp.float32(bits), jnp.int32(done - 1)), self._prompts))
        if self.is_main:
            stem = os.path.join(self.workdir, "samples", f"step_{done:06d}_bits_{bits:g}")
            _, image = s.family.write_samples(stem, self._teacher_samples, student)
            if image is not None:
                log.add_image("samples/teacher_top_student_bottom", image, done)


def _cache_size(fn) -> int:
    try:
        return int(fn._cache_size())
    except Exception:  # private API; report 0 when unavailable
        return 0


def run(config=None, *, workdir: str | None = None, force_resume: bool = False) -> RunResult:
    """Trains a FraQAT student (see the package docstring). ``config``: ConfigDict, dict or None.

    ``force_resume``: resume even when the checkpoint's config differs (recorded in metrics.jsonl).
    """
    cfg = _as_config(config)
    r = _Run(cfg, os.path.abspath(workdir or DEFAULT_WORKDIR), force_resume)
    try:
        return _train(r)
    finally:
        r.ckpt.close()


def _train(r: _Run) -> RunResult:
    cfg, s = r.cfg, r.setup
    events = []
    start, position = r.resume(lambda row, text: events.append((row, text)))
    progress = Progress(r.total, start, cfg.progress, enabled=r.is_main)
    progress.message(r.describe())
    log = MetricsLog(r.workdir, start, enabled=r.is_main)
    for row, text in events:
        progress.message(text)
        if row is not None:
            log.write(row)
    if start:
        progress.message(f"resumed from {r.ckpt.directory}/{start} (data position {position})")
    if r.is_main:
        with open(os.path.join(r.workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
    step_fn = s.step_fn()
    loop = _Loop(r, step_fn, log, progress, start, position)
    t_run = time.perf_counter()
    try:
        status = loop.run()
    finally:
        progress.close()
        log.close()
    return _finish(r, loop, status, time.perf_counter() - t_run, _cache_size(step_fn))


class _Loop:
    """The step loop. Device values are read only at check steps (log, checkpoint, bit change, stop)."""

    def __init__(self, r: _Run, step_fn, log, progress, start: int, position: int):
        self.r, self.step_fn, self.log, self.progress = r, step_fn, log, progress
        self.start, self.position = start, position
        self.rows: list = []
        self.last_loss = float("nan")
        self.last_bits = float(r.bits_values[max(start - 1, 0)])
        self.checked_step = start  # every step up to here is known finite

    def run(self) -> str:
        r, cfg = self.r, self.r.cfg
        host, hosts = jax.process_index(), jax.process_count()
        window_t, window_n = time.perf_counter(), 0
        finite, first_bad = jnp.array(True), jnp.array(-1, jnp.int32)
        # Under the mesh: the TPU flash-attention kernel is placed by shard_map over its axes.
        with _StopFlag() as stop, jax.set_mesh(r.mesh):
            for step in range(self.start, r.total):
                local = r.source.batch(self.position, int(cfg.batch_size), host_index=host, host_count=hosts)
                r.setup.train_state, metrics = self.step_fn(r.setup.train_state, r.setup.teacher_state, r.setup.rest,
                                                            _global_batch(local, r.mesh))
                # Stays on the device: no host sync until a check step.
                first_bad = jnp.where(finite & ~metrics["finite"], step + 1, first_bad)
                finite = finite & metrics["finite"]
                done, window_n = step + 1, window_n + 1
                self.position += 1
                bits = float(r.bits_values[step])
                log_now = done % cfg.log_every == 0 or done == r.total
                stage_end = done == r.total or float(r.bits_values[min(done, r.total - 1)]) != bits
                stopping = stop.signum is not None  # read once: a signal may arrive while this step is written
                save_now = stopping or done % cfg.checkpoint_every == 0 or done == r.total
                if not (log_now or save_now or (cfg.sample_grids and stage_end)):
                    self.progress.update(done, bits, self.last_loss, self._rate(), None)
                    continue
                if not bool(finite):
                    return self._diverged(int(first_bad), done)
                self.checked_step = done
                row = None
                if log_now:
                    now = time.perf_counter()
                    row = self._row(done, bits, metrics, window_n / (now - window_t))
                    window_t, window_n = now, 0
                self.last_loss, self.last_bits = float(metrics["loss"]), bits
                self.progress.update(done, bits, self.last_loss, self._rate(), row)
                if cfg.sample_grids and stage_end:
                    r.sample_grid(done, bits, self.log)
                if save_now:
                    r.save(done, self.position)
                if stopping:
                    self.progress.message(f"{signal.Signals(stop.signum).name} received: saved step {done} to "
                                          f"{r.ckpt.directory}; run the same command again to resume")
                    return "preempted"
        return "completed"

    def _rate(self) -> float:
        return self.rows[-1]["steps_per_sec"] if self.rows else 0.0

    def _row(self, done, bits, metrics, rate) -> dict:
        row = {"step": done, "bits": float(metrics["bits"]), "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
               "grad_norm": float(metrics["grad_norm"]), "steps_per_sec": rate, "data_position": self.position}
        self.log.write(row)
        self.rows.append(row)
        return row

    def _diverged(self, bad: int, checked: int) -> str:
        self.progress.message(
            f"the loss became non-finite at step {bad} (seen at the check after step {checked}); stopping. The last "
            f"good checkpoint is kept in {self.r.ckpt.directory} (step {self.r.ckpt.latest_step()}).")
        self.bad_step = bad
        return "nan"


def _finish(r: _Run, loop: _Loop, status: str, seconds: float, compilations: int) -> RunResult:
    if status == "nan":
        done_steps = loop.checked_step
    else:
        done_steps = int(jax.device_get(r.setup.train_state["step"]))
    result = RunResult(workdir=r.workdir, steps=done_steps, final_loss=loop.last_loss, final_bits=loop.last_bits,
                       metrics=loop.rows, status=status, seconds=seconds, compilations=compilations)
    if r.is_main:
        summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "metrics"}
        summary.update(schedule=r.cfg.schedule, total_steps=r.total, stage_losses=_stage_losses(loop.rows))
        with open(os.path.join(r.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if status == "nan":
        raise TrainingDiverged(f"loss became non-finite at step {loop.bad_step}; last good checkpoint kept in "
                               f"{r.ckpt.directory} (step {r.ckpt.latest_step()})")
    return result


def _stage_losses(rows):
    out = {}
    for row in rows:
        out[f"{row['bits']:g}"] = row["loss"]  # last logged loss of each bit-width
    return out
