"""``python -m fraqat_jax.compare``: the paper's comparison (Table 1, Fig. 7) at small scale, paired.

On one teacher, one data source and one budget of optimizer steps, for each of ``--seeds`` seeds
(default 5):

========  ==============================================================================
method    what it is
========  ==============================================================================
ptq       dynamic post-training quantization at W(B)A8: the teacher's weights, no training
qat       vanilla QAT: constant B bits for the whole run (trainer schedule ``constant``)
integer   the paper's integer staircase 8, 7, 6, 5, 4 (ending at B)
simple    the paper's 16, 8, 4 staircase (ending at B)
fraqat    FraQAT: 8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4 (ending at B)
linear    bits falling linearly from ``start_bits`` to B (beyond the paper)
cosine    bits falling along a half cosine from ``start_bits`` to B (beyond the paper)
========  ==============================================================================

(Any other schedule name of :data:`fraqat_jax.schedules.NAMES` that the trainer accepts is a
method too, named as the schedule.)

**Paired seeds.** Every trained method uses the trainer (``fraqat_jax.train.run``) with the same
config apart from the schedule and the seed; seed ``k`` of K is ``config.seed + k``. The trainer
draws the data order from the seed (``fraqat_jax.data``: one permutation per epoch of
``(seed, epoch)``) and the diffusion noise and timesteps of step ``i`` from
``fold_in(key(seed), i)``, so at seed ``k`` every method sees exactly the same batches, noise and
timesteps, and differs only in how the bit-width comes down. Results are therefore compared per
seed against vanilla QAT: ratios ``method / qat`` per seed, their mean, and a 95% **paired
Student-t** confidence interval (``scipy.stats.t``; see :mod:`fraqat_jax.compare.stats`). Only the
CI decides: ``better`` if it lies below 1, ``worse`` above, else a ``tie``.

Each run is scored by :class:`fraqat_jax.eval.evaluate.Evaluator` on the same held-out inputs and
sampling noise: validation loss at ``--eval-points`` checkpoints and at the end, then ``fd``,
``mse``, ``psnr`` and ``accuracy`` of the final student's samples against the teacher's.
Diagnostics per run (``diagnostics`` in ``compare.json``): the training loss at the first step at
the target bits against PTQ's validation loss, the loss jump at each change of bits (last loss of
the old width -> first of the new) and the share of quantized weights whose target-bit code differs
from the teacher's (PTQ's) at the end.

**Language models** (a Gemma-2 teacher, e.g. ``--config configs/lm_default.py``): runs are scored by
:class:`fraqat_jax.eval.text.TextEvaluator` on the run's held-out token windows (the same for every
seed and method): the validation loss is the mean per-token KL(teacher || student), and ``ppl`` the
student's perplexity; ``compare.json`` then adds ``ppl_ratio`` / ``ppl_ratio_ci`` (paired as above)
and has no FD, MSE, PSNR or accuracy keys.

``--tune KEY=V1,V2,...`` (e.g. ``lr=1e-4,3e-4,1e-3``) first picks, per method, the value with the
lowest mean validation loss on ``--tune-seeds`` seeds (``config.seed + 1000 + k``) scored on a
separate set of validation inputs, then reports on the fresh seeds ``config.seed + k`` as above.

``--grid KEY=V1,V2,...`` (repeatable, any trainer config key) runs the whole comparison at every
combination of values, in ``workdir/<key=value,...>/``, and writes ``grid.json`` (every cell's
paired ratios and CIs) and ``grid.png`` (heatmap of the FraQAT / QAT ratio, CI in each cell).

Writes to ``--workdir`` (default ``runs/compare``):

- ``compare.json``: one object per method: ``method``, ``schedule``, ``final_bits``, ``seeds``
  (the seed values), each metric's mean over seeds with ``<metric>_std``, ``per_seed`` values,
  ``val_loss_ratio`` / ``fd_ratio`` (mean of the per-seed ratios to vanilla QAT) with
  ``val_loss_ratio_ci`` / ``fd_ratio_ci`` (``[low, high]``, 95%), per-seed ``val_loss_ratios``,
  differences ``val_loss_diff`` (+ ``_ci``), ``verdict``, ``diagnostics`` and the validation curve;
- ``compare.md``: the same as a table, with the run's settings; ``compare.png``: the curves;
- ``xla_cache/``: JAX's persistent compilation cache (unless ``JAX_COMPILATION_CACHE_DIR`` or
  ``jax_compilation_cache_dir`` names another), so seeds after the first reuse the compiled step.

Bad input (unknown method, bad config key, a config file that is missing, a bad ``--grid`` or
``--tune``) exits with status 2 and one line on stderr.

The part holds ``run.py`` (training and scoring every method, the grid), ``stats.py`` (paired
statistics, tables, plots, the regime-map grid) and ``__main__.py`` (the command line). It imports
``train/`` (it trains), ``eval/`` (it scores), ``runs/`` (it reads checkpoints), ``nn/``, ``quant/``
and ``schedules``; nothing imports it but its command line and ``docs/claim_map.py``.
"""

from fraqat_jax.compare.run import (DEFAULT_SEEDS, DEFAULT_WORKDIR, METHODS, METRICS, SCHEDULE_OF, TUNE_SEED_OFFSET,
                                    TUNE_VAL_SEED, code_change_share, run_compare, run_diagnostics, run_grid,
                                    schedule_of)
from fraqat_jax.compare.stats import markdown, plot, write_outputs

__all__ = ["DEFAULT_SEEDS", "DEFAULT_WORKDIR", "METHODS", "METRICS", "SCHEDULE_OF", "TUNE_SEED_OFFSET", "TUNE_VAL_SEED",
           "build_parser", "code_change_share", "main", "markdown", "plot", "run_compare", "run_diagnostics",
           "run_grid", "schedule_of", "write_outputs"]


def __getattr__(name):
    if name in ("main", "build_parser"):  # the command line, imported only when asked for
        from fraqat_jax.compare import __main__ as cli

        return getattr(cli, name)
    raise AttributeError(f"module 'fraqat_jax.compare' has no attribute {name!r}")
