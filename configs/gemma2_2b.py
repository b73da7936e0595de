"""Gemma-2-2B(-IT) to W4A8, the paper's language-model row: the FraQAT schedule (8 -> 4 bits in
fractional steps), every linear layer of the blocks at W4A8, the tied embedding / LM head in float,
distilled with the forward KL(teacher || student) of the next-token distributions.

The paper's appendix says: Gemma-2-2B-IT, FP16 -> W4A8, the same schedule, a C4 subset of 384K
training and 38.4K validation samples. It gives no sequence length, batch or learning rate for it;
we chose:

- ``seq_len`` 512 (C4 documents are about 400-500 tokens at the median; each window starts with
  ``<bos>``, longer documents are packed over several windows);
- ``batch_size`` 64 and ``lr`` 1e-5 (constant after 100 warmup steps; LLM-QAT's order of magnitude);
- ``steps`` 150000 = the schedule's 25 epochs of 384K samples at batch 64 (``--steps`` rescales the
  schedule to any budget).

Teacher: a transformers folder (``config.json``, safetensors, ``tokenizer.json``) given as
``FRAQAT_TEACHER`` or ``--set teacher=PATH`` (default: the preset with random weights, which runs but
only makes sense for timing and ``plan``). Text: ``FRAQAT_TEXT``, a ``.jsonl`` file (``text`` field)
or a folder of them, for example the C4 subset (``--set data=text:PATH`` or ``data=tfds:c4/en``
work too). For example::

    FRAQAT_TEACHER=/models/gemma-2-2b-it FRAQAT_TEXT=/data/c4_subset \\
        python -m fraqat_jax.train --config configs/gemma2_2b.py --workdir runs/gemma2_2b
"""

import os

from _paper import paper_config


def get_config():
    cfg = paper_config("gemma-2-2b", lr=1e-5, batch_size=64, latents="",
                       data="text:" + os.environ.get("FRAQAT_TEXT", "data/c4_subset"),
                       seq_len=512, loss="kl", steps=150000, num_samples=4, sample_tokens=32)
    cfg.pop("sample_steps")  # the image runs' sampler steps: a language-model run has no such key
    return cfg
