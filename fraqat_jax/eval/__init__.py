"""Evaluation: how faithful a student is to its teacher; imports ``diffusion/``, ``models/``, ``nn/``,
``quant/``, ``data/``, never ``train/`` (its command line may).

- the samplers (DDPM / DDIM / Euler) live in :mod:`fraqat_jax.diffusion.samplers` and are re-exported
  here.
- :mod:`fraqat_jax.eval.fid`: the Frechet distance between feature sets.
- :mod:`fraqat_jax.eval.inception`: Inception-v3 (pool3, 2048 features) for FID, loading the
  standard FID weights from a user-supplied file.
- :mod:`fraqat_jax.eval.classifier`: the small digits classifier shipped for the built-in default
  (features for a Frechet distance, accuracy on class-conditional samples).
- :mod:`fraqat_jax.eval.t2i`: text-to-image evaluation (``--prompts``/``--vae``): teacher vs student
  images per prompt, decoded in JAX.
- :mod:`fraqat_jax.eval.text`: language models: multiple-choice accuracy with lm-evaluation-harness's
  rule (``mc``, ``boolq``, ``commonsense_qa`` task files), perplexity, per-token KL, the comparison's
  text evaluator.
- :mod:`fraqat_jax.eval.lm_eval_adapter`: the harness model ``fraqat`` (registered on import; needs
  the ``lm-eval`` extra).
- ``python -m fraqat_jax.eval --workdir DIR``: evaluates a trained student against its teacher
  and writes ``DIR/eval.json``.
"""

from fraqat_jax.eval.fid import feature_statistics, frechet_distance, frechet_distance_from_features
from fraqat_jax.diffusion.samplers import ddim_sample, ddpm_sample, euler_sample, make_noise, make_sampler, sample

__all__ = [
    "ddim_sample",
    "ddpm_sample",
    "euler_sample",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "make_noise",
    "make_sampler",
    "sample",
]
