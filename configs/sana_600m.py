"""Sana 600M: lr 1e-7, batch 128 (paper). Rectified flow.

Needs the teacher's weights and a latents cache: see configs/_paper.py. For example::

    FRAQAT_TEACHER=/models/Sana-600M/transformer FRAQAT_LATENTS=/data/ye_pop_sana_600m \
        python -m fraqat_jax.train --config configs/sana_600m.py --workdir runs/sana_600m
"""

from _paper import paper_config


def get_config():
    return paper_config("Sana-600M", lr=1e-7, batch_size=128, latents="data/latents/sana_600m")
