"""The built-in language-model default: the shipped tiny Gemma-2 distilled to W4A8 on CPU in a few minutes.

The teacher (``teacher=builtin:lm``, ``fraqat_jax/assets/tiny_gemma2``) is a 0.38 M-parameter
Gemma-2 (4 layers alternating a 64-token sliding window and global attention, soft caps, grouped
queries, tied embeddings) pretrained by ``python -m fraqat_jax.pretrain.text`` on CPython's standard
library (PSF licence); the distillation text is standard-library source shipped beside it
(``train.jsonl``), cut into 128-token windows, the last 2% held out. The student is W4A8 (every
linear layer of the blocks; embedding / LM head in float) trained with the FraQAT schedule on the
forward KL of the next-token distributions. Activation ranges are static (each layer's input range
calibrated once before training, then fixed): the form a phone runs, so ``export --format qnn``
writes the very student that ``generate --model frozen`` decodes with. Run it in its own workdir::

    python -m fraqat_jax.train --config configs/lm_default.py --workdir runs/lm_default

It writes what the image default writes (metrics.jsonl, tb/, checkpoints/, summary.json) and, at
each change of bit-width, ``samples/step_*_bits_*.txt``: teacher and student greedy continuations
of four held-out prompts.
"""

from importlib.resources import files


def get_config():
    shipped = files("fraqat_jax").joinpath("assets", "tiny_gemma2")
    return {
        "teacher": "builtin:lm",
        "data": "text:" + str(shipped.joinpath("train.jsonl")),
        "seq_len": 128,
        "loss": "kl",
        "act_ranges": "static",
        "steps": 200,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 10,
        "num_samples": 4,
        "sample_tokens": 32,
        "log_every": 10,
        "checkpoint_every": 50,
    }
