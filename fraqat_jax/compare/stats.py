"""Paired statistics and the outputs (tables, plots, regime-map grid) of ``python -m fraqat_jax.compare``.

Pairing: seed ``k`` gives every method the same data order, diffusion noise and timesteps (the
trainer draws the batch order from ``seed`` and the noise from ``fold_in(key(seed), step)``), so a
method's run at seed ``k`` and vanilla QAT's run at seed ``k`` differ only in the bit schedule (and
the learning rate, where ``--tune`` picked different ones). The comparison is made per seed:

    r_k = value(method, seed k) / value(qat, seed k)        (val loss, FD)
    ratio = mean_k r_k
    95% CI = ratio -+ t_{0.975, n-1} * sd(r_k) / sqrt(n)      (paired Student t, scipy.stats.t)

A method is ``better`` than vanilla QAT when the whole CI lies below 1, ``worse`` when it lies
above 1, and a ``tie`` when the CI contains 1 (or there is a single seed, which has no CI).
Differences ``value(method) - value(qat)`` get the same t interval (``*_diff``, ``*_diff_ci``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fraqat_jax import schedules

CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """``(mean, [low, high])``: the Student-t confidence interval of the mean of ``values``.

    ``None`` for the interval with fewer than 2 values; ``[mean, mean]`` when they are all equal.
    """
    from scipy import stats

    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None
    sd = float(x.std(ddof=1))
    if sd == 0.0 or np.all(x == x[0]):
        return mean, [mean, mean]
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1)) * sd / math.sqrt(x.size)
    return mean, [mean - half, mean + half]


def verdict(ci: list[float] | None, null: float = 1.0) -> str:
    """``better`` (CI below ``null``), ``worse`` (above) or ``tie`` (contains it, or no CI)."""
    if ci is None:
        return "tie"
    if ci[1] < null:
        return "better"
    if ci[0] > null:
        return "worse"
    return "tie"


def paired(values: Sequence[float | None], reference: Sequence[float | None]) -> dict[str, Any] | None:
    """Per-seed ratios and differences of ``values`` against ``reference`` with t intervals.

    Seeds where either value is missing (None) or the reference is 0 are left out of the ratio.
    Returns None when no seed is left.
    """
    pairs = [(v, r) for v, r in zip(values, reference) if v is not None and r is not None]
    if not pairs:
        return None
    ratios = [v / r for v, r in pairs if r != 0]
    diffs = [v - r for v, r in pairs]
    out: dict[str, Any] = {"ratios": ratios, "diffs": diffs}
    if ratios:
        out["ratio"], out["ratio_ci"] = t_interval(ratios)
    out["diff"], out["diff_ci"] = t_interval(diffs)
    return out


def add_paired(results: list[dict[str, Any]], reference: str = "qat") -> None:
    """Adds, in place, to every row the paired keys against the ``reference`` method's row:
    ``val_loss_ratio``, ``val_loss_ratio_ci``, ``val_loss_diff``, ``val_loss_diff_ci``,
    ``val_loss_ratios`` (per seed), the same for ``fd`` and (text runs) ``ppl``, and ``verdict``
    (from the val-loss CI) and ``fd_verdict`` (runs with an FD). Nothing is added when there is no
    reference row."""
    ref = next((r for r in results if r["method"] == reference), None)
    if ref is None:
        return
    for row in results:
        for metric in ("val_loss", "fd", "ppl"):
            p = paired(row["per_seed"].get(metric, []), ref["per_seed"].get(metric, []))
            if p is None or "ratio" not in p:
                continue
            row[f"{metric}_ratio"], row[f"{metric}_ratio_ci"] = p["ratio"], p["ratio_ci"]
            row[f"{metric}_ratios"] = p["ratios"]
            row[f"{metric}_diff"], row[f"{metric}_diff_ci"] = p["diff"], p["diff_ci"]
        row["verdict"] = verdict(row.get("val_loss_ratio_ci")) if row is not ref else "reference"
        if "fd" in ref["per_seed"]:
            row["fd_verdict"] = verdict(row.get("fd_ratio_ci")) if row is not ref else "reference"


def fmt_ratio(row: dict[str, Any], metric: str = "val_loss") -> str:
    """``0.962 [0.91, 1.01]`` (or ``–``)."""
    if f"{metric}_ratio" not in row:
        return "–"
    ci = row.get(f"{metric}_ratio_ci")
    text = f"{row[f'{metric}_ratio']:.3f}"
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [no CI]")


# ----------------------------------------------------------------------------- grids


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=1e-4,3e-4", "steps=225"]`` -> ``{"lr": ["1e-4", "3e-4"], "steps": ["225"]}``."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"--grid {spec!r} is not allowed: use KEY=V1,V2,...")
        if key in axes:
            raise ValueError(f"--grid key {key!r} is given twice")
        axes[key] = vals
    return axes


def grid_points(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    """A folder name for a grid point, e.g. ``lr=0.0003,steps=900`` (``/`` replaced by ``_``)."""
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_").replace(" ", "")


def cell(point: dict[str, str], results: list[dict[str, Any]], workdir: str) -> dict[str, Any]:
    """One ``grid.json`` cell: the point and, per method, its paired keys against vanilla QAT."""
    keep = ("seeds", "val_loss", "fd", "val_loss_ratio", "val_loss_ratio_ci", "fd_ratio", "fd_ratio_ci",
            "val_loss_diff", "val_loss_diff_ci", "verdict", "fd_verdict", "tuned")
    return {"point": point, "workdir": workdir,
            "methods": {r["method"]: {k: r[k] for k in keep if k in r} for r in results}}


def plot_grid(grid: dict[str, Any], path: str, method: str = "fraqat") -> None:
    """Heatmap of ``method``'s val-loss ratio to vanilla QAT, its 95% CI written in each cell.

    The first grid axis runs along x, the second along y; any further axes make one panel per
    combination of their values. Colour: log ratio, blue below 1 (better than QAT), red above.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    axes = grid["axes"]
    keys = list(axes)
    xk, yk = keys[0], (keys[1] if len(keys) > 1 else None)
    rest = keys[2:]
    panels = grid_points({k: axes[k] for k in rest}) if rest else [{}]
    xs, ys = axes[xk], axes[yk] if yk else [""]
    lookup = {tuple(c["point"][k] for k in keys): c for c in grid["cells"]}
    ratios = [c["methods"].get(method, {}).get("val_loss_ratio") for c in grid["cells"]]
    finite = [abs(math.log(r)) for r in ratios if r]
    span = max(finite + [0.05])
    fig, axs = plt.subplots(1, len(panels), figsize=(max(6.0, 1.9 * len(xs) * len(panels) + 1.5), 1.1 * len(ys) + 1.9),
                            squeeze=False)
    for ax, panel in zip(axs[0], panels):
        data = np.full((len(ys), len(xs)), np.nan)
        for i, yv in enumerate(ys):
            for j, xv in enumerate(xs):
                key = tuple({xk: xv, **({yk: yv} if yk else {}), **panel}[k] for k in keys)
                m = lookup.get(key, {}).get("methods", {}).get(method, {})
                r = m.get("val_loss_ratio")
                if r is None:
                    continue
                data[i, j] = math.log(r)
                ci = m.get("val_loss_ratio_ci")
                text = f"{r:.3f}\n" + (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "[no CI]")
                weight = "bold" if m.get("verdict") in ("better", "worse") else "normal"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight=weight)
        ax.imshow(data, cmap="coolwarm", norm=TwoSlopeNorm(0.0, -span, span), aspect="auto")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(xk)
        if yk:
            ax.set_ylabel(yk)
        ax.set_title(", ".join(f"{k}={v}" for k, v in panel.items()) or f"{method} / qat val loss", fontsize=9)
    fig.suptitle(f"{method} / vanilla QAT validation loss: mean of per-seed ratios [95% paired-t CI]\n"
                 "bold: the CI excludes 1 (blue: better than QAT, red: worse)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- one comparison's outputs


def _fmt(row, k, digits=4):
    if k not in row:
        return "–"
    return f"{row[k]:.{digits}g} ± {row[k + '_std']:.2g}"


def _diag_brief(row) -> str:
    d = row.get("diagnostics") or []
    if not d:
        return "–"
    first = [x["first_target_vs_ptq"] for x in d if x.get("first_target_vs_ptq") is not None]
    codes = np.mean([x["codes_changed"] for x in d])
    return (f"{np.mean(first):.3g}" if first else "–") + f" / {100 * codes:.1f}%"


def _markdown_text(results, settings) -> str:
    """compare.md of a language-model comparison: held-out KL and perplexity, no samples."""
    lines = [
        (f"Teacher-student comparison of a language model at W{settings['target_bits']:g}A{settings['act_bits']:g}: "
         f"{settings['steps']} steps, {settings['seeds']} seeds ({', '.join(map(str, settings['seed_values']))}), "
         "mean ± standard deviation over seeds; ratios to vanilla QAT are means of paired per-seed ratios "
         "with their 95% paired-t CI; a CI that contains 1 is a tie."),
        "",
        ("| method | final bits | val loss (KL) | perplexity | val loss / QAT [95% CI] | perplexity / QAT [95% CI] "
         "| verdict | first loss at target / PTQ, codes changed |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['final_bits']:g} | {_fmt(r, 'val_loss', 3)} | {_fmt(r, 'ppl', 4)} | "
                     f"{fmt_ratio(r)} | {fmt_ratio(r, 'ppl')} | {r.get('verdict', '–')} | {_diag_brief(r)} |")
    lines += [
        "",
        f"Settings: teacher `{settings['teacher']}`, data `{settings['data']}`, batch {settings['batch_size']}, "
        f"lr {settings['lr']:g} ({settings['lr_schedule']}, {settings['warmup_steps']} warmup). Val loss: mean "
        f"per-token KL(teacher || student) on {settings['num_val']} held-out windows ({settings['val_tokens']} "
        f"predicted tokens), perplexity on the same (teacher: {settings['teacher_ppl']:.4g}). Total time "
        f"{settings['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def markdown(results, settings) -> str:
    if "teacher_ppl" in settings:
        return _markdown_text(results, settings)
    lines = [
        (f"Teacher-student comparison at W{settings['target_bits']:g}A{settings['act_bits']:g}: "
         f"{settings['steps']} steps, {settings['seeds']} seeds ({', '.join(map(str, settings['seed_values']))}), "
         "mean ± standard deviation over seeds; ratios to vanilla QAT are means of paired per-seed ratios "
         "with their 95% paired-t CI; a CI that contains 1 is a tie."),
        "",
        ("| method | final bits | val loss | FD | MSE | PSNR (dB) | accuracy | val loss / QAT [95% CI] | "
         "FD / QAT [95% CI] | verdict | first loss at target / PTQ, codes changed |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['final_bits']:g} | {_fmt(r, 'val_loss', 3)} | {_fmt(r, 'fd', 3)} | "
            f"{_fmt(r, 'mse', 3)} | {_fmt(r, 'psnr', 4)} | {_fmt(r, 'accuracy', 3)} | "
            f"{fmt_ratio(r)} | {fmt_ratio(r, 'fd')} | {r.get('verdict', '–')} | "
            f"{_diag_brief(r)} |"
        )
    ta = settings.get("teacher_accuracy")
    tuned = [f"{r['method']} {r['tuned']['key']}={r['tuned']['value']}" for r in results if "tuned" in r]
    lines += [
        "",
        f"Settings: teacher `{settings['teacher']}`, data `{settings['data']}`, batch {settings['batch_size']}, "
        f"lr {settings['lr']:g} ({settings['lr_schedule']}, {settings['warmup_steps']} warmup), linear/cosine "
        f"from {settings['start_bits']:g} bits. Val loss: teacher-student MSE on {settings['num_val']} held-out "
        f"inputs. Samples: {settings['num_samples']} per model, {settings['sampler']} with "
        f"{settings['sample_steps']} steps, the same noise for teacher and students; FD on "
        f"{settings['fd_features']} features against the teacher's samples; MSE/PSNR image for image; "
        f"accuracy: the digits classifier on the student's class-conditional samples"
        + (f" (teacher: {ta:.3f})" if ta is not None else "")
        + (f". Tuned on separate seeds: {', '.join(tuned)}" if tuned else "")
        + f". Total time {settings['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot(results, settings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axb) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        c = r["curve"]
        color = colors[i % len(colors)]
        steps, mean, std = np.array(c["step"]), np.array(c["val_loss"]), np.array(c["val_loss_std"])
        if r["method"] == "ptq":
            ax.axhline(mean[0], color=color, ls="--", lw=1, label="ptq (no training)")
            continue
        ax.plot(steps, mean, marker="o", ms=3, color=color, label=r["method"])
        ax.fill_between(steps, np.maximum(mean - std, mean * 0.05), mean + std, color=color, alpha=0.15)
        sched = schedules.by_name(r["schedule"], settings["steps"], target_bits=settings["target_bits"],
                                  start_bits=settings["start_bits"])
        b = sched.values(settings["steps"])
        axb.step(np.arange(1, len(b) + 1), b, where="post", color=color, lw=1.2)
        for s in np.nonzero(np.diff(b))[0] + 1:
            if r["method"] == "fraqat":
                ax.axvline(s, color=color, lw=0.5, ls=":", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("validation loss (held-out KL)" if "teacher_ppl" in settings else "validation loss (teacher-student MSE)")
    ax.set_title(f"W{settings['target_bits']:g}A{settings['act_bits']:g}, {settings['steps']} steps, "
                 f"{settings['seeds']} seeds (mean, ±1 std shaded; dotted: FraQAT bit changes)")
    ax.legend(fontsize=8, ncol=2)
    axb.set_ylabel("weight bits")
    axb.set_xlabel("optimizer step")
    axb.set_ylim(max(2.0, settings["target_bits"] - 0.5), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results, settings, workdir: str) -> None:
    """``compare.json``, ``compare_settings.json``, ``compare.md`` and ``compare.png`` in ``workdir``."""

    with open(os.path.join(workdir, "compare.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "compare_settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(markdown(results, settings))
    plot(results, settings, os.path.join(workdir, "compare.png"))
