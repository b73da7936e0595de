"""plan/: ``python -m fraqat_jax.plan`` compiles the real FraQAT train step for a TPU topology that is not here.

::

    python -m fraqat_jax.plan --config FILE --topology NAME [--batch-size N] [--mesh SPEC]
                              [--set KEY=VALUE ...] [--mfu F] [--json PATH] [--run K]

It builds what ``python -m fraqat_jax.train`` runs for the config (frozen teacher, quantized student,
AdamW state, mesh and shardings, the same jitted step) from shapes alone (no weights, no data) and
compiles it ahead of time with libtpu for ``NAME`` (``v5e:2x2``, ``v5p:2x2x1``, ``v6e:2x4``, ...;
see :data:`GENERATIONS`), the way MaxText's ``train_compile.py`` does. ``local`` compiles for this
machine's devices instead, and ``--run K`` then runs K steps on random inputs.

Input shapes come from the run's model family (``fraqat_jax.family``): ``example_batch`` at the
size ``example_size`` gives for the config, the size the trainer would train at (diffusion: the
teacher's ``sample_size`` or ``image_size``; text: ``seq_len`` tokens, e.g. ``--set seq_len=2048``).
For an image family ``--set resolution=PIXELS`` gives the latent size through the family's VAE factor
(8, Sana's DC-AE 32; pixel data such as the built-in digits: 1); conditioning lengths are the diffusers
pipelines' defaults. The step is called and its FLOPs counted through the family's
``training_inputs`` and ``apply``, so any registered family plans (``configs/gemma2_2b.py`` too).

Exit status: 0 compiled and fits; 1 does not fit (the compiler's RESOURCE_EXHAUSTED); 2 bad input.

The part holds ``topology.py`` (TPU generations, input shapes), ``build.py`` (the abstract train
state, compilation, the report), ``flops.py`` (the analytic FLOP count) and ``__main__.py``. It
imports ``recipe/`` (the config, the state builder, the run's family; never ``train/``), ``parallel/`` (the mesh) and
``nn/``; nothing imports it but its command line. JAX must not start before
``topology.prepare_environment``, so this package imports no JAX at import time.
"""

from fraqat_jax.plan.topology import GENERATIONS, PlanError, Topology, input_spec, parse_topology

__all__ = ["GENERATIONS", "PlanError", "Topology", "input_spec", "main", "parse_topology", "plan"]


def plan(*args, **kwargs):
    """See :func:`fraqat_jax.plan.build.plan` (imported lazily: JAX must start after the environment)."""
    from fraqat_jax.plan.build import plan as build_plan

    return build_plan(*args, **kwargs)


def __getattr__(name):
    if name == "main":  # the command line, imported only when asked for
        from fraqat_jax.plan import __main__ as cli

        return cli.main
    raise AttributeError(f"module 'fraqat_jax.plan' has no attribute {name!r}")
