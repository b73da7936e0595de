"""Agreement of the QNN HTP form with onnxruntime and with JAX, per family and product width.

For each family's tiny config (tests/models' configs, random weights, W4A8 with the paper's W4A16
last layer, static ranges calibrated on 16 inputs) and each ``--product-bits`` value, writes the
QNN form, runs it on the HTP simulator (CPU fallback disabled) and prints, over held-out inputs,
max|QNN - onnxruntime CPU| / max|out|, max|QNN - JAX| / max|out| and max|onnxruntime CPU - JAX| /
max|out| (what the file itself computes). docs/deploy.md quotes its output.

    python benchmarks/qnn_agreement.py [--families dit,pixart,sd3,sana,flux] [--bits 16,8] [--seeds 11,12,13]

Needs the qnn extra and the repository's tests/ folder (the tiny configs and input makers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="dit,pixart,sd3,sana,flux")
    p.add_argument("--bits", default="16,8")
    p.add_argument("--seeds", default="11,12,13")
    args = p.parse_args(argv)

    import fraqat_jax
    from fraqat_jax.export import qnn
    from fraqat_jax.export.onnx import frozen_output, static_view
    from test_export_onnx import CONFIGS
    from test_export_qnn import _family_feeds, family_student

    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'family':8} {'bits':>4}  {'QNN vs ORT (max, per input)':38} {'QNN vs JAX':30} ORT vs JAX")
    for family in args.families.split(","):
        _, config = CONFIGS[family]
        model, example, calibration = family_student(family)
        frozen = fraqat_jax.freeze(static_view(model))
        for bits in (int(b) for b in args.bits.split(",")):
            with tempfile.TemporaryDirectory() as out:
                written = qnn.write_qnn(model, example, calibration, out, frozen=frozen, product_bits=bits)
                prologue = written["paths"].get("prologue")
                htp = qnn.QnnModel(qnn.qnn_session(written["paths"]["model"]), prologue)
                cpu = qnn.QnnModel(qnn.cpu_session(written["paths"]["model"]), prologue)
                rows = []
                for seed in seeds:
                    kwargs, feeds = _family_feeds(family, config, seed=seed)
                    got, ort, ref = htp(feeds), cpu(feeds), frozen_output(frozen, kwargs)
                    rows.append((qnn.rel_diff(got, ort), qnn.rel_diff(got, ref), qnn.rel_diff(ort, ref)))
            cols = np.asarray(rows).T
            fmt = lambda c: f"{c.max():.2e} [{' '.join(f'{v:.1e}' for v in c)}]"  # noqa: E731
            print(f"{family:8} {bits:>4}  {fmt(cols[0]):38} {fmt(cols[1]):30} {fmt(cols[2])}", flush=True)


if __name__ == "__main__":
    main()
