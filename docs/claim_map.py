"""Gathers the regime-map cells of docs/claim.md into one grid (``claim_cpu_grid.json``) and its
heatmap (``claim_cpu_grid.png``), using the comparison's own cell and plot functions.

    python docs/claim_map.py RUNS_DIR [--out docs]

``RUNS_DIR`` holds one ``python -m fraqat_jax.compare`` workdir per cell, named as in
:data:`CELLS` (the commands are in docs/claim.md). Cells that are missing are left out.
"""
import argparse
import json
import os

from fraqat_jax import compare_stats

# folder -> what differs from the default (built-in teacher, W4A8, lr 3e-4 cosine, 225 steps)
CELLS = {
    "default": "default",
    "restart": "lr restart per stage",
    "lr1e-4": "lr 1e-4",
    "lr1e-3": "lr 1e-3",
    "bits3": "W3A8",
    "steps900": "900 steps",
    "size_m": "builtin:m teacher",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = p.parse_args(argv)
    cells, names = [], []
    for folder, name in CELLS.items():
        path = os.path.join(a.runs, folder, "compare.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = json.load(f)
        cells.append(compare_stats.cell({"cell": name}, rows, folder))
        names.append(name)
    grid = {"axes": {"cell": names}, "cells": cells}
    with open(os.path.join(a.out, "claim_cpu_grid.json"), "w") as f:
        json.dump(grid, f, indent=1)
    compare_stats.plot_grid(grid, os.path.join(a.out, "claim_cpu_grid.png"))
    for c in cells:
        for method, m in c["methods"].items():
            if "val_loss_ratio_ci" in m and method != "qat":
                lo, hi = m["val_loss_ratio_ci"]
                flo, fhi = m.get("fd_ratio_ci") or (float("nan"), float("nan"))
                print(f"| {c['point']['cell']} | {len(m['seeds'])} | {method} | {m['val_loss_ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
                      f" | {m['fd_ratio']:.2f} [{flo:.2f}, {fhi:.2f}] | {m['verdict']} |")


if __name__ == "__main__":
    main()
