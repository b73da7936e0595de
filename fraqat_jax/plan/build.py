"""The planner's work behind ``python -m fraqat_jax.plan`` (see :mod:`fraqat_jax.plan`).

:func:`plan` loads the trainer config, builds the teacher, the quantized student, the optimizer
state, the mesh and the shardings from shapes alone, lowers the trainer's jitted step
(``fraqat_jax.recipe.step.make_train_step``) on ``jax.ShapeDtypeStruct`` inputs, compiles it for the
topology's devices and returns the report. Imported only after the environment is set for libtpu.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax.plan import flops as flops_lib
from fraqat_jax.nn import set_bits
from fraqat_jax.plan.topology import (
    GENERATIONS,
    PlanError,
    Topology,
    parse_oom,
    tokens_of,
    topology_devices,
)
from fraqat_jax.parallel import mesh as mesh_lib
from fraqat_jax.recipe.config import TRAIN_KEYS, ConfigError, family_keys, load_config
from fraqat_jax.recipe.models import family_of_run
from fraqat_jax.recipe.state import build as build_state

__all__ = ["plan"]

# Dense bf16 peak FLOP/s of GPUs `local` may find (vendor data sheets), for the estimate only.
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "MI300X": 1307e12}


def _load(path, overrides, batch_size, mesh):
    """(config, resolution or None, data kind). ``resolution`` is the planner's own key unless the
    trainer's config has one. The data itself is never opened: a latents directory that does not
    exist here (the usual case when planning) is accepted."""
    overrides = list(overrides)
    resolution = None
    planner_key = "resolution" not in TRAIN_KEYS and "resolution" not in family_keys()
    if planner_key:
        keep = []
        for item in overrides:
            key, _, value = item.partition("=")
            if key.strip() == "resolution":
                try:
                    resolution = int(value)
                except ValueError:
                    raise PlanError(f"resolution={value!r} is not allowed: use an image size in pixels") from None
                if resolution < 1:
                    raise PlanError(f"resolution={resolution} is not allowed: use a positive image size in pixels")
            else:
                keep.append(item)
        overrides = keep
    if batch_size is not None:
        overrides.append(f"batch_size={batch_size}")
    if mesh is not None:
        overrides.append(f"mesh={mesh}")
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        if "latents directory" not in str(e):
            raise PlanError(str(e)) from None
        # Planning needs the batch's shapes, not the cache: stand in a source of the same kind.
        cfg = load_config(path, overrides + ["data=datafree"])
        return cfg, resolution, "latents"
    if not planner_key and "resolution" in cfg:
        resolution = int(cfg.resolution) or None
    kind = cfg.data.split(":")[0]
    return cfg, resolution, kind


def _count_params(pure) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pure)))


def _plain(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _build(cfg, mesh, spec):
    """The trainer's state and step, abstract and sharded (``recipe.state.build(abstract=True)``),
    plus the batch: ``(setup, step_fn, (train_state, teacher_state, rest, batch))``."""
    setup = build_state(cfg, mesh, abstract=True)
    b = int(cfg.batch_size)
    batch = {k: jax.ShapeDtypeStruct((b, *shape), jnp.dtype(dtype), sharding=mesh_lib.batch_sharding(mesh, 1 + len(shape)))
             for k, (shape, dtype) in spec.items()}
    return setup, setup.step_fn(), (setup.train_state, setup.teacher_state, setup.rest, batch)


def _model_flops(setup, args) -> tuple[int, int]:
    """Analytic forward FLOPs of teacher and student on the whole global batch: the family's
    ``apply`` on the shapes of its ``training_inputs`` (the inputs themselves are not counted)."""
    _, teacher_abs, rest_abs, batch_abs = (_plain(a) for a in args)
    params_abs = _plain(args[0]["params"])
    family, cfg, tg, sg = setup.family, setup.cfg, setup.teacher_graph, setup.student_graph
    inputs = jax.eval_shape(lambda batch: family.training_inputs(jax.random.key(0), batch, cfg), batch_abs)

    def teacher_fwd(state, inputs):
        return family.apply(nnx.merge(tg, state), inputs)

    def student_fwd(params, rest, inputs):
        student = nnx.merge(sg, params, rest)
        set_bits(student, jnp.float32(4.0))
        return family.apply(student, inputs)

    return (flops_lib.count_flops(teacher_fwd, teacher_abs, inputs),
            flops_lib.count_flops(student_fwd, params_abs, rest_abs, inputs))


def _local_capacity(device) -> tuple[int | None, float | None]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if limit is None and device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = next((v for k, v in _GPU_PEAK.items() if k in device.device_kind), None)
    return limit, peak


def _random_tree(abstract, key):
    """Arrays shaped and sharded like ``abstract``: floats ~ N(0, 0.02), integers 0; one jitted call."""
    leaves, treedef = jax.tree.flatten(abstract)

    def make(key):
        keys = jax.random.split(key, max(len(leaves), 1))
        return [(0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
                if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype) for k, a in zip(keys, leaves)]

    return jax.tree.unflatten(treedef, jax.jit(make, out_shardings=[a.sharding for a in leaves])(key))


def _random_inputs(args, setup, seed=0):
    """Concrete inputs of the abstract ``args``: random weights and batch, AdamW state from tx.init."""
    state_abs, teacher_abs, rest_abs, batch_abs = args
    k_params, k_teacher, k_rest, k_batch = jax.random.split(jax.random.key(seed), 4)
    params = _random_tree(state_abs["params"], k_params)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_sh["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state,
             "ema": jax.tree.map(jnp.copy, params) if state_abs["ema"] is not None else None,
             "step": jax.device_put(jnp.zeros((), jnp.int32), state_abs["step"].sharding)}
    return state, _random_tree(teacher_abs, k_teacher), _random_tree(rest_abs, k_rest), _random_tree(batch_abs, k_batch)


def _run_local(compiled, args, setup, steps: int) -> tuple[float, int]:
    """Median seconds of ``steps`` steps after one warm-up step, and peak device (or process) bytes."""
    state, teacher, rest, batch = _random_inputs(args, setup)
    state, metrics = compiled(state, teacher, rest, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, teacher, rest, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return statistics.median(times), int(peak)


def _custom_kernels(compiled) -> int | None:
    """How many Pallas (Mosaic) kernel calls the compiled TPU program holds: the flash / splash
    attention kernels when they are in the program, 0 when XLA runs attention; None if unreadable."""
    try:
        return compiled.as_text().count('custom_call_target="tpu_custom_call"')
    except Exception:  # noqa: BLE001  (a backend without HLO text: the count is only informative)
        return None


def _progress(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr, flush=True)


def _example_size(cfg, family, config, resolution, data_kind) -> tuple[dict, int | None]:
    """(size keywords of the family's ``example_batch``, resolution in pixels or None). The family
    says the run's size (``Family.example_size``); ``resolution=PIXELS``, the planner's own key,
    replaces an image family's latent size through the VAE factor."""
    size = dict(family.example_size(cfg, config))
    if "latent_size" not in size:
        if resolution is not None:
            raise PlanError(f"resolution={resolution} is not allowed for a {family.name} teacher: it sizes image "
                            f"families; set {', '.join(f'{k}=N' for k in size) or 'the family size keys'} instead")
        return size, None
    factor = 1 if data_kind in ("digits", "tfds") else int(getattr(family, "vae_factor", 1))
    if resolution is None:
        return size, size["latent_size"] * factor
    if resolution % factor:
        raise PlanError(f"resolution={resolution} is not divisible by the {family.name} VAE factor {factor}")
    size["latent_size"] = resolution // factor
    return size, resolution


def plan(config_path, top: Topology, *, overrides=(), batch_size=None, mesh=None, mfu=0.4, run_steps=0) -> dict:
    """Compiles the trainer's step for ``top`` and returns the report (keys: see the module doc)."""
    cfg, resolution, data_kind = _load(config_path, overrides, batch_size, mesh)
    devices = jax.devices() if top.name == "local" else topology_devices(top)
    try:
        mesh_obj = mesh_lib.build_mesh(cfg.mesh, devices)
    except mesh_lib.MeshError as e:
        raise PlanError(f"{e} (topology {top.name} has {len(devices)} devices)") from None
    n_batch = mesh_obj.shape["data"] * mesh_obj.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % n_batch:
        raise PlanError(f"batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} is not divisible by the "
                        f"{n_batch} devices on the data and fsdp mesh axes")
    try:
        family = family_of_run(cfg)
        _, model_config = family.teacher_spec(cfg)
    except ValueError as e:  # an unknown preset, a folder without config.json, an unsupported class
        raise PlanError(str(e)) from None
    size, resolution = _example_size(cfg, family, model_config, resolution, data_kind)
    latent = size.get("latent_size")
    spec = family.example_batch(model_config, **size)
    _progress(f"building {cfg.teacher} abstractly on a {dict(mesh_obj.shape)} mesh of {len(devices)} "
              f"{devices[0].device_kind} devices")
    setup, step_fn, args = _build(cfg, mesh_obj, spec)
    _progress("counting FLOPs")
    teacher_fwd, student_fwd = _model_flops(setup, args)
    image_tokens, text_tokens = tokens_of(family, model_config, spec)
    if top.name == "local":
        hbm, peak = _local_capacity(devices[0])
    else:
        gen = GENERATIONS[top.generation]
        hbm, peak = gen.hbm_bytes, gen.peak_bf16_flops
    report = {
        "topology": top.name, "chips": len(devices), "device_kind": devices[0].device_kind,
        "hbm_bytes_per_chip": hbm, "peak_flops_per_chip": peak, "batch_size": int(cfg.batch_size),
        "grad_accum": int(cfg.grad_accum), "mesh": {k: int(v) for k, v in mesh_obj.shape.items()},
        "teacher": cfg.teacher, "family": family.name, "resolution": resolution, "latent_size": latent,
        **({"seq_len": int(size["seq_len"])} if "seq_len" in size else {}),
        "tokens_per_example": image_tokens + text_tokens, "image_tokens": image_tokens, "text_tokens": text_tokens,
        "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": bool(cfg.remat),
        # nnx.Param only: the teacher's state also holds buffers (SD3's 384x384 position table).
        "params": {"teacher": _count_params(nnx.state(setup.teacher(), nnx.Param)),
                   "student": _count_params(args[0]["params"])},
        "teacher_state_elements": _count_params(args[1]),
        "flops": {"teacher_forward": teacher_fwd, "student_forward": student_fwd},
        "flops_per_step": flops_lib.distillation_step_flops(teacher_fwd, student_fwd),
        "mfu": mfu, "oom": None, "measured_step_seconds": None, "peak_bytes": None, "run_steps": run_steps,
    }
    for key in ("scan_layers", "attention"):
        if key in cfg:
            report[key] = cfg[key]
    report["estimated_step_seconds"] = (report["flops_per_step"] / (len(devices) * peak * mfu)) if peak else None
    _progress(f"compiling the train step for {top.name}")
    t0 = time.perf_counter()
    hits = []  # a hit in JAX's persistent compilation cache makes compile_seconds a load time
    report["compile_cache_hit"] = False

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:
        # Under the mesh, as the Pallas attention kernel needs it to be placed by shard_map.
        with jax.set_mesh(mesh_obj):
            compiled = step_fn.lower(*args).compile()
    except Exception as e:  # XLA reports running out of HBM as an exception at compile time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["compile_seconds"] = time.perf_counter() - t0
        need, have = parse_oom(str(e))
        first = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e)[:300])
        over = f"needs {need / 2**30:.2f} GiB of {have / 2**30:.2f} GiB per chip, {(need - have) / 2**30:.2f} GiB " \
               f"over; " if need else ""
        report.update(fits=False, oom=f"{over}{first.strip()}", required_bytes_per_chip=need,
                      exceeded_by_bytes=(need - have) if need else None,
                      per_chip={k: None for k in ("argument", "output", "alias", "temp", "code", "total")})
        return report
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    report["compile_seconds"] = time.perf_counter() - t0
    report["compile_cache_hit"] = bool(hits)
    m = compiled.memory_analysis()
    per_chip = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes}
    per_chip = {k: int(v) for k, v in per_chip.items()}
    per_chip["total"] = per_chip["argument"] + per_chip["output"] - per_chip["alias"] + per_chip["temp"] + per_chip["code"]
    report["per_chip"] = per_chip
    report["custom_kernels"] = _custom_kernels(compiled)
    report["fits"] = hbm is None or per_chip["total"] <= hbm
    if not report["fits"]:
        report["oom"] = (f"needs {per_chip['total'] / 2**30:.2f} GiB of {hbm / 2**30:.2f} GiB per device, "
                         f"{(per_chip['total'] - hbm) / 2**30:.2f} GiB over")
    if run_steps and report["fits"]:
        report["measured_step_seconds"], report["peak_bytes"] = _run_local(compiled, args, setup, run_steps)
    return report
