"""One tiny comparison shared by the compare, eval and export tests (trained once per test run:
under xdist the first worker to need it trains it, under a file lock, and the others read it).

A 1-block random DiT teacher (adaLN-Zero's zero init replaced by random weights, so teacher and
student outputs are not trivially zero); ``compare`` trains vanilla QAT and FraQAT for 6 steps
with 2 paired seeds at a 3-bit target, and its run folders double as trained students for
``eval`` and ``export``.
"""

import functools
import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from filelock import FileLock
from flax import nnx

TINY_DIT = {"sample_size": 8, "patch_size": 2, "in_channels": 1, "out_channels": 2, "num_layers": 1,
            "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10}
STEPS, SEEDS, TARGET_BITS, NUM_SAMPLES, NUM_VAL = 6, 2, 3.0, 24, 16


def write_tiny_teacher(directory) -> str:
    from fraqat_jax.models import DiTTransformer2DModel
    from fraqat_jax.diffusion.teachers import save_builtin_teacher

    model = DiTTransformer2DModel(TINY_DIT, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = v[...].shape
        v[...] = jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0] if len(shape) > 1 else 8), jnp.float32)
    return save_builtin_teacher(model, str(directory))


def _run_tiny_compare(root: Path):
    from fraqat_jax import compare

    teacher = write_tiny_teacher(root / "teacher")
    return compare.main([
        "--workdir", str(root / "compare"), "--steps", str(STEPS), "--seeds", str(SEEDS), "--methods", "ptq,qat,fraqat",
        "--eval-points", "2", "--num-samples", str(NUM_SAMPLES), "--num-val", str(NUM_VAL),
        "--target-bits", str(TARGET_BITS),
        "--set", f"teacher={teacher}", "--set", "batch_size=16", "--set", "warmup_steps=1",
    ])


@functools.cache
def tiny_compare():
    """``(workdir, compare.json rows)``; ``workdir/fraqat/seed_0`` is a trained run. Tests read it
    and write elsewhere."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # one process: its own folder
        root = Path(tempfile.mkdtemp(prefix="fraqat_eval_tests_"))
        return root / "compare", _run_tiny_compare(root)
    root = Path(tempfile.gettempdir()) / f"fraqat_eval_tests_{run_id}"
    done = root / "done"
    with FileLock(f"{root}.lock"):
        if not done.exists():
            root.mkdir(exist_ok=True)
            _run_tiny_compare(root)
            done.touch()
    return root / "compare", json.loads((root / "compare" / "compare.json").read_text())


def trained_run() -> str:
    return str(tiny_compare()[0] / "fraqat" / "seed_0")
