"""Evaluation: how faithful a student is to its teacher. Learns about the model only through its
family (``family/``: ``evaluation`` picks the evaluator; the family's inputs, apply, loss and
sampler feed it); imports ``recipe/``, ``runs/``, ``models/``, ``nn/``, ``quant/``, ``data/``,
``parallel/``, never ``train/`` nor a family package, its command line neither.

- :mod:`fraqat_jax.eval.evaluate`: :class:`~fraqat_jax.eval.evaluate.Evaluator`, validation loss and
  sample metrics for any family that samples (images: Frechet distance, digits accuracy).
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

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]
