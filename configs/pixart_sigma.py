"""PixArt-Sigma (XL/2, 512 px): lr 1e-6, batch 128 (paper). DDPM epsilon + variance outputs.

Needs the teacher's weights and a latents cache: see configs/_paper.py. For example::

    FRAQAT_TEACHER=/models/PixArt-Sigma-XL-2-512/transformer FRAQAT_LATENTS=/data/ye_pop_pixart_sigma \
        python -m fraqat_jax.train --config configs/pixart_sigma.py --workdir runs/pixart_sigma
"""

from _paper import paper_config


def get_config():
    return paper_config("PixArt-Sigma-XL-2-512", lr=1e-6, batch_size=128, latents="data/latents/pixart_sigma")
