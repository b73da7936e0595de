"""FLUX.1-schnell: the paper gives no learning rate or batch for FLUX; we use PixArt-Sigma's (1e-6, 128). Rectified flow on 2x2-packed latents.

Needs the teacher's weights and a latents cache: see configs/_paper.py. For example::

    FRAQAT_TEACHER=/models/FLUX.1-schnell/transformer FRAQAT_LATENTS=/data/ye_pop_flux_schnell \
        python -m fraqat_jax.train --config configs/flux_schnell.py --workdir runs/flux_schnell
"""

from _paper import paper_config


def get_config():
    return paper_config("FLUX.1-schnell", lr=1e-6, batch_size=128, latents="data/latents/flux_schnell")
