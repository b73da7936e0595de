"""TPU topologies and input shapes for ``fraqat_jax.plan``: chips, HBM and peak FLOP/s per generation,
libtpu's topology names, the devices of a topology that is not present, the batch shapes of each
family, and the compiler's out-of-memory message. Imports no JAX at module level: the environment
libtpu needs must be set before JAX starts (``prepare_environment``)."""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 1024**3


class PlanError(ValueError):
    """Bad input (exit 2): the message names the bad value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Generation:
    libtpu_name: str  # the prefix libtpu's topology names use
    chip_config: str  # "megacore": one device per chip (two TensorCores), else "default"
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip, per second
    shapes: tuple[str, ...]  # slice shapes listed as known


# Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak bf16 FLOP/s and HBM per chip.
_SHAPES_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8")
_SHAPES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "megacore", 32 * GiB, 275e12, _SHAPES_3D),
    "v5e": Generation("v5e", "default", 16 * GiB, 197e12, _SHAPES_2D),
    "v5p": Generation("v5p", "megacore", 95 * GiB, 459e12, _SHAPES_3D + ("8x8x16", "8x16x16", "16x16x16")),
    "v6e": Generation("v6e", "default", 32 * GiB, 918e12, _SHAPES_2D),
}



@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given: "v5e:2x2" or "local"
    generation: str | None
    dims: tuple[int, ...]

    @property
    def chips(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


def known_topologies() -> list[str]:
    return [f"{g}:{s}" for g, gen in GENERATIONS.items() for s in gen.shapes] + ["local"]


def parse_topology(name: str) -> Topology:
    """``"v5e:2x4"`` -> Topology; raises PlanError listing the known names."""
    if name == "local":
        return Topology("local", None, ())
    gen, _, shape = name.partition(":")
    if gen not in GENERATIONS or shape not in GENERATIONS[gen].shapes:
        raise PlanError(f"unknown topology {name!r}; known topologies: {', '.join(known_topologies())}")
    return Topology(name, gen, tuple(int(d) for d in shape.split("x")))


def require_libtpu(top: Topology) -> None:
    if top.name == "local":
        return
    try:
        import libtpu  # noqa: F401  (the wheel only locates libtpu.so: cheap to import)
    except ImportError:
        raise PlanError(f"compiling for {top.name!r} needs libtpu: pip install 'fraqat_jax[tpu]'") from None


def topology_devices(top: Topology):
    """The TPU devices of ``top`` from libtpu's topology description (no TPU needed)."""
    require_libtpu(top)
    from jax.experimental.topologies import get_topology_desc

    gen = GENERATIONS[top.generation]
    dims3 = tuple(top.dims) + (1,) * (3 - len(top.dims))
    per_host = tuple(min(d, 2) for d in dims3[:2]) + (1,)
    # Full pods are tori (MaxText's table): 16-wide dims of v5e/v6e, v4/v5p cubes of 4x4x4 and up.
    if len(top.dims) == 2:
        wrap = tuple(d == 16 for d in top.dims) + (False,)
    else:
        wrap = (min(top.dims) >= 4,) * 3
    desc = get_topology_desc(platform="tpu", topology_name=f"{gen.libtpu_name}:{'x'.join(map(str, top.dims))}",
                             chip_config_name=gen.chip_config, chips_per_host_bounds=per_host, num_slices=1,
                             wrap=wrap)
    return list(desc.devices)


def prepare_environment(top: Topology) -> None:
    """libtpu settings for ahead-of-time compilation on a machine without TPUs; before JAX starts."""
    if top.name == "local":
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Several planners (pytest -n 2) may hold libtpu at once; none of them drives a TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- inputs


def _family(family):
    from fraqat_jax.family import family_named

    return family_named(family) if isinstance(family, str) else family


def input_spec(family, model_config, *, latent_size: int, pixel_data: bool = False) -> dict:
    """Per-example batch fields ``{name: (shape, dtype name)}`` the trainer's data source yields:
    the family's ``example_batch`` (``fraqat_jax.family``; the object or its name) at latent
    height = width ``latent_size``."""
    return _family(family).example_batch(model_config, latent_size=latent_size)


def tokens_of(family, model_config, spec: dict) -> tuple[int, int]:
    """(image tokens, text tokens) per example (a language model's window: all text); ``family``:
    the object or its name (an image family's ``patch_size`` gives latent pixels per token)."""
    if "latents" not in spec:
        return 0, int(spec["input_ids"][0][0]) if "input_ids" in spec else 0
    _, h, w = spec["latents"][0]
    fam = _family(family)
    patch = fam.patch_size(model_config) if hasattr(fam, "patch_size") else int(model_config.get("patch_size", 1) or 1)
    text = spec["encoder_hidden_states"][0][0] if "encoder_hidden_states" in spec else 0
    return (h // patch) * (w // patch), text


# ----------------------------------------------------------------------------- report


_OOM_PATTERNS = (
    re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available [^(]*\(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def parse_oom(message: str) -> tuple[int | None, int | None]:
    """(required bytes, available bytes) from XLA's RESOURCE_EXHAUSTED message, or Nones."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            need = float(m.group(1)) * _UNITS[m.group(2)]
            have = float(m.group(3)) * _UNITS[m.group(4)]
            return int(need), int(have)
    return None, None


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def print_table(r: dict) -> None:
    rows = [("topology", f"{r['topology']} ({r['chips']} chips, {_fmt_bytes(r['hbm_bytes_per_chip'])} each)"),
            ("config", (f"{r['teacher']} ({r['family']}), batch {r['batch_size']}, grad_accum {r['grad_accum']}, "
                       + (f"seq_len {r['seq_len']}" if r.get("seq_len") is not None
                          else f"resolution {r['resolution']} -> latent {r['latent_size']}"))),
            ("mesh", ", ".join(f"{k}={v}" for k, v in r["mesh"].items())),
            ("tokens / example", f"{r['tokens_per_example']} ({r['image_tokens']} image + {r['text_tokens']} text)"),
            ("params", f"teacher {r['params']['teacher'] / 1e6:.1f}M, student {r['params']['student'] / 1e6:.1f}M")]
    pc = r["per_chip"]
    rows += [(f"per chip: {k}", _fmt_bytes(pc[k])) for k in ("argument", "output", "alias", "temp", "code", "total")]
    rows += [("fits", ("yes" if r["fits"] else f"NO: {r.get('oom', '')}")),
             ("Pallas kernels", "-" if r.get("custom_kernels") is None
              else f"{r['custom_kernels']} tpu_custom_call(s) in the compiled program"),
             ("FLOPs / step", f"{r['flops_per_step']:.3e} (teacher fwd + student fwd and bwd)"),
             ("est. step time", "-" if r["estimated_step_seconds"] is None
              else f"{r['estimated_step_seconds']:.4g} s at MFU {r['mfu']}"),
             ("compile", f"{r['compile_seconds']:.1f} s" + (" (loaded from JAX's persistent compilation cache; a "
                                                           "cold compile takes longer)" if r.get("compile_cache_hit") else ""))]
    if r.get("measured_step_seconds") is not None:
        rows += [("measured step", f"{r['measured_step_seconds']:.4f} s (median of {r['run_steps']})"),
                 ("peak memory", _fmt_bytes(r.get("peak_bytes")))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# ----------------------------------------------------------------------------- command line


