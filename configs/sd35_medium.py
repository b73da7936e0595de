"""SD3.5-Medium: lr 1e-6, batch 256 (paper). Rectified flow, logit-normal timesteps (mean 0, std 1, as SD3 trains).

Needs the teacher's weights and a latents cache: see configs/_paper.py. For example::

    FRAQAT_TEACHER=/models/SD3.5-Medium/transformer FRAQAT_LATENTS=/data/ye_pop_sd35_medium \
        python -m fraqat_jax.train --config configs/sd35_medium.py --workdir runs/sd35_medium
"""

from _paper import paper_config


def get_config():
    return paper_config("SD3.5-Medium", lr=1e-6, batch_size=256, latents="data/latents/sd35_medium")
