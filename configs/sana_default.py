"""The text-to-image default: the shipped tiny Sana pipeline's transformer distilled to W4A8 from prompts.

The teacher (``teacher=builtin:sana``, ``fraqat_jax/assets/tiny_sana``, a diffusers ``SanaPipeline``
folder built by ``python -m fraqat_jax.pretrain.sana``) is Sana's architecture in miniature: the
shipped tiny Gemma-2 as text encoder (its last hidden states after the final norm, 32 tokens with an
attention mask), a DC-AE, and a linear-attention ``SanaTransformer2DModel`` trained with rectified
flow on the DC-AE latents of the UCI digits (enlarged to 32x32), conditioned on captions such as
"a handwritten seven" or "the digit 7". ``data=captions`` builds the training examples in JAX
from that folder: the digits through its DC-AE, the training captions through its text encoder
(10% of them the empty caption, the unconditional input of classifier-free guidance). The student
is W4A8 (every linear layer) trained with the paper's FraQAT schedule on the teacher's velocity::

    python -m fraqat_jax.train --config configs/sana_default.py --workdir runs/sana_default
"""


def get_config():
    return {
        "teacher": "builtin:sana",
        "data": "captions",
        "steps": 450,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_steps": 10,
        "num_samples": 10,
        "log_every": 10,
        "checkpoint_every": 50,
    }
