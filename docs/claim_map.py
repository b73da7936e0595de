"""Gathers the regime-map cells of docs/claim.md into one grid (``claim_cpu_grid.json``) and its
heatmap (``claim_cpu_grid.png``), using the comparison's own cell and plot functions.

    python docs/claim_map.py RUNS_DIR [--out docs]
    python docs/claim_map.py --json FILE [FILE ...] [--out docs] [--name claim_map]
    python docs/claim_map.py --collect SEED_RUNS --device NAME --to FILE

``--json`` merges per-seed result files (what ``benchmarks/claim_gpu.sh`` writes, or ``--collect``
makes of a CPU run): per device, the seeds of a cell from every file are pooled (a seed present in
two files keeps the later file's values), the paired statistics are recomputed over the pool
(``benchmarks/claim_gpu.py``'s ``paired_stats``), and ``NAME.json`` (cells x methods) and
``NAME.png`` (heatmap of method / vanilla QAT per cell) are written; the table rows for
docs/claim.md are printed. ``--collect`` turns a folder of one-seed comparisons
(``SEED_RUNS/<cell>/s<seed>/compare.json``, as ``claim_gpu.py`` lays them out) into such a file,
so per-seed values are committed and later sessions can pool new seeds with them.

The positional form (the previous rounds' comparison folders) is kept for those folders:

``RUNS_DIR`` holds one ``python -m fraqat_jax.compare`` workdir per cell, named as in
:data:`CELLS` (the commands are in docs/claim.md); a cell may be several workdirs run on other
seeds (``restart``, ``restart_b``, ``restart_c``), whose per-seed values are pooled before the
paired statistics (a method missing from one of them counts as missing at its seeds). Cells that
are missing are left out.
"""
import argparse
import glob
import json
import os
import sys

from fraqat_jax.compare import stats as compare_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claim_gpu  # noqa: E402  (the cells and the per-seed statistics; a script folder, not the package)

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


def collect(runs: str, device: str) -> dict:
    """``runs/<cell>/s<seed>/compare.json`` -> the per-seed file format of ``claim_gpu.py``."""
    out = {"device": device, "cells": {}}
    for path in sorted(glob.glob(os.path.join(runs, "*", "s*", "compare.json"))):
        cell, seed = path.split(os.sep)[-3], path.split(os.sep)[-2][1:]
        c = out["cells"].setdefault(cell, {"seeds": {}})
        if cell in claim_gpu.CELLS:
            what, args, methods, _ = claim_gpu.CELLS[cell]
            c.update(what=what, args=args, methods=methods.split(","))
        c["seeds"][seed] = claim_gpu.seed_rows(path)
    for c in out["cells"].values():
        c["stats"] = claim_gpu.paired_stats(c["seeds"])
    return out


def merge(files: list[str]) -> dict:
    """Pools the cells of per-seed files by (device, cell); returns ``{device: {cell: cell}}``."""
    pooled: dict = {}
    for path in files:
        with open(path) as f:
            data = json.load(f)
        if data.get("smoke"):
            continue
        for name, c in data["cells"].items():
            cell = pooled.setdefault(data.get("device", "unknown"), {}).setdefault(
                name, {k: v for k, v in c.items() if k not in ("seeds", "stats")} | {"seeds": {}})
            cell["seeds"].update(c["seeds"])
    for cells in pooled.values():
        for c in cells.values():
            c["stats"] = claim_gpu.paired_stats(c["seeds"])
    return pooled


def write_map(pooled: dict, out: str, name: str) -> list[str]:
    """``NAME.json`` / ``NAME.png`` and the markdown rows of every (device, cell, method)."""
    lines, grid_cells, xs, ys = [], [], [], []
    for device, cells in pooled.items():
        for cell_name, c in cells.items():
            label = cell_name if len(pooled) == 1 else f"{cell_name} ({device})"
            xs.append(label)
            for method, st in c["stats"].items():
                if method in ("qat", "ptq") or "val_loss_ratio" not in st:
                    continue
                if method not in ys:
                    ys.append(method)
                grid_cells.append({"point": {"cell": label, "method": method}, "workdir": cell_name,
                                   "methods": {"schedule": st}})
                ratios = st["val_loss_ratios"]
                ci, fci = st.get("val_loss_ratio_ci"), st.get("fd_ratio_ci")
                ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[no CI]"
                fd_text = (f"{st['fd_ratio']:.2f} [{fci[0]:.2f}, {fci[1]:.2f}]" if fci else
                           f"{st.get('fd_ratio', float('nan')):.2f} [no CI]")
                first = st.get("first_target_vs_ptq_median")
                lines.append(f"| {label} | {len(ratios)} | {method} | **{st['val_loss_ratio']:.3f}** {ci_text} | "
                             f"{fd_text} | {st['verdict']} (better on {st['better_on']} of {len(ratios)}) | "
                             f"{'–' if first is None else f'{first:.2f}'} |")
    grid = {"axes": {"cell": xs, "method": ys}, "cells": grid_cells, "devices": list(pooled),
            "pooled": {d: {n: {k: c[k] for k in ("seeds", "stats") if k in c} for n, c in cells.items()}
                       for d, cells in pooled.items()}}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(grid, f, indent=1)
    if grid_cells:
        compare_stats.plot_grid(grid, os.path.join(out, f"{name}.png"), "schedule")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="?")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--json", nargs="+", default=None, help="per-seed files to pool (claim_gpu.sh output)")
    p.add_argument("--name", default="claim_map", help="output name for --json (NAME.json, NAME.png)")
    p.add_argument("--collect", default=None, help="folder of one-seed comparisons to turn into a per-seed file")
    p.add_argument("--device", default=None, help="with --collect: the machine the runs ran on")
    p.add_argument("--to", default=None, help="with --collect: the per-seed file to write")
    a = p.parse_args(argv)
    if a.collect:
        if not (a.device and a.to):
            p.error("--collect needs --device and --to")
        with open(a.to, "w") as f:
            json.dump(collect(a.collect, a.device), f, indent=1)
        print(f"wrote {a.to}")
        return
    if a.json:
        lines = write_map(merge(a.json), a.out, a.name)
        print("| cell | seeds | method | val loss / QAT [95% CI] | FD / QAT [95% CI] | verdict | first 4-bit loss / PTQ |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(lines))
        return
    if not a.runs:
        p.error("give RUNS_DIR, --json FILE ... or --collect DIR")
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
