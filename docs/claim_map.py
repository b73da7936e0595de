"""Gathers the regime-map cells of docs/claim.md into one grid (``claim_cpu_grid.json``) and its
heatmap (``claim_cpu_grid.png``), using the comparison's own cell and plot functions.

    python docs/claim_map.py RUNS_DIR [--out docs]

``RUNS_DIR`` holds one ``python -m fraqat_jax.compare`` workdir per cell, named as in
:data:`CELLS` (the commands are in docs/claim.md); a cell may be several workdirs run on other
seeds (``restart``, ``restart_b``, ``restart_c``), whose per-seed values are pooled before the
paired statistics (a method missing from one of them counts as missing at its seeds). Cells that
are missing are left out.
"""
import argparse
import json
import os

from fraqat_jax import compare_stats

# what differs from the default (built-in teacher, W4A8, lr 3e-4 cosine, 225 steps) -> folders
CELLS = {
    "default": ("default",),
    "lr restart per stage": ("restart", "restart_b", "restart_c"),
    "lr 1e-4": ("lr1e-4",),
    "lr 1e-3": ("lr1e-3",),
    "W3A8": ("bits3",),
    "900 steps": ("steps900", "steps900_b"),
    "builtin:m teacher": ("size_m",),
}


def pooled(row_sets):
    """One list of compare rows from several comparisons of the same cell on other seeds."""
    methods = list(dict.fromkeys(r["method"] for rows in row_sets for r in rows))
    out = []
    for method in methods:
        seeds, per_seed = [], {"val_loss": [], "fd": []}
        for rows in row_sets:
            ref = next(r for r in rows if r["method"] == "qat")
            row = next((r for r in rows if r["method"] == method), None)
            seeds += ref["seeds"]
            for k in per_seed:
                per_seed[k] += row["per_seed"][k] if row else [None] * len(ref["seeds"])
        out.append({"method": method, "seeds": seeds, "per_seed": per_seed})
    compare_stats.add_paired(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = p.parse_args(argv)
    cells, names, lines = [], [], []
    for name, folders in CELLS.items():
        paths = [os.path.join(a.runs, f, "compare.json") for f in folders]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            continue
        row_sets = []
        for path in paths:
            with open(path) as f:
                row_sets.append(json.load(f))
        rows = row_sets[0] if len(row_sets) == 1 else pooled(row_sets)
        cells.append(compare_stats.cell({"cell": name}, rows, ",".join(folders)))
        names.append(name)
        for r in rows:
            if r["method"] in ("qat", "ptq") or "val_loss_ratio_ci" not in r:
                continue
            ratios = r["val_loss_ratios"]
            (lo, hi), (flo, fhi) = r["val_loss_ratio_ci"], r["fd_ratio_ci"]
            lines.append(f"| {name} | {len(ratios)} | {r['method']} | **{r['val_loss_ratio']:.3f}** [{lo:.3f}, {hi:.3f}] | "
                         f"{r['fd_ratio']:.2f} [{flo:.2f}, {fhi:.2f}] | {r['verdict']} (better on "
                         f"{sum(x < 1 for x in ratios)} of {len(ratios)}) |")
    grid = {"axes": {"cell": names}, "cells": cells}
    with open(os.path.join(a.out, "claim_cpu_grid.json"), "w") as f:
        json.dump(grid, f, indent=1)
    compare_stats.plot_grid(grid, os.path.join(a.out, "claim_cpu_grid.png"))
    print("| cell | seeds | method | val loss / QAT [95% CI] | FD / QAT [95% CI] | verdict |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
