"""Sana 600M: lr 1e-7, batch 128 (paper). Rectified flow.

Needs the teacher's weights and a latents cache: see configs/_paper.py. For example::

    FRAQAT_TEACHER=/models/Sana-600M/transformer FRAQAT_LATENTS=/data/ye_pop_sana_600m \
        python -m fraqat_jax.train --config configs/sana_600m.py --workdir runs/sana_600m
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_paper", os.path.join(os.path.dirname(__file__), "_paper.py"))
_paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paper)


def get_config():
    return _paper.paper_config("Sana-600M", lr=1e-7, batch_size=128, latents="data/latents/sana_600m")
