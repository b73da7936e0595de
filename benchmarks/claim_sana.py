"""The claim on Sana's architecture: PTQ, vanilla QAT and FraQAT on ``configs/sana_default.py``,
paired by seed, scored by validation loss and by what the images show.

    python benchmarks/claim_sana.py --seeds 1234-1243 --workdir runs/claim_sana --out docs/claim_sana_seeds.json
    python benchmarks/claim_sana.py --summary docs/claim_sana_seeds.json      # the table, from the JSON
    python benchmarks/claim_sana.py --seeds 1234 --steps 4 --smoke            # a CPU check in minutes

Each seed is one ``fraqat_jax.compare`` of the three methods at that seed (``seeds=1``, the
comparison's validation loss: teacher-student MSE of the velocity on 512 held-out noised latents).
Then each method's final student (PTQ: the calibrated student at the final bits, as the comparison
scores it) samples the prompts of the teacher's held-out caption templates (5 templates x 10 digits)
from the same noise as the teacher, with the pipeline's own sampler, guidance and DC-AE
(:func:`fraqat_jax.eval.prompted.evaluate_prompted`, what ``eval --prompts`` runs): prompted-digit
accuracy and FD on the digits classifier's features (``fd``: against the real digits, the table's;
``fd_vs_teacher``: against the teacher's images from the same noise, recorded too). The JSON is
rewritten after every seed, so a cut-off call keeps what finished and a rerun skips the seeds it
holds. Ratios against QAT with 95% t-intervals over seeds (:func:`fraqat_jax.compare.stats.paired`);
accuracy as a paired difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ptq", "qat", "fraqat")


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if sep else [int(a)])
    return out


def heldout_prompts(folder) -> list[str]:
    from fraqat_jax.data.captions import caption, read_extras

    return [caption(t, d) for t in read_extras(folder)["templates"]["heldout"] for d in range(10)]


def run_seed(seed: int, args) -> dict:
    import jax

    from fraqat_jax import runs, train
    from fraqat_jax.compare.run import run_compare
    from fraqat_jax.eval.prompted import evaluate_prompted, prompt_digits
    from fraqat_jax.family import family_for_model
    from fraqat_jax.nn import set_bits

    sets = [f"seed={seed}", "progress=none"] + ([f"steps={args.steps}"] if args.steps else []) + list(args.set)
    cfg = train.load_config(args.config, sets)
    workdir = os.path.join(args.workdir, f"seed_{seed}")
    t0 = time.perf_counter()
    results = run_compare(cfg, workdir=workdir, seeds=1, methods=METHODS, eval_points=1, num_samples=2,
                          num_val=args.num_val, log=lambda m: print(m, flush=True))
    row = {"seed": seed, "val_loss": {r["method"]: r["per_seed"]["val_loss"][0] for r in results}}

    teacher, ptq = train.build_models(cfg.to_dict())
    set_bits(ptq, float(cfg.target_bits))
    family = family_for_model(teacher)
    pipeline = family.prompt_pipeline(cfg)
    prompts = heldout_prompts(pipeline.folder)
    digits = prompt_digits(prompts, "the held-out templates")
    students = {"ptq": ptq}
    for method in ("qat", "fraqat"):
        _, students[method], _ = runs.load_run(os.path.join(workdir, method, "seed_0"))
    row["prompted"] = {}
    for method, student in students.items():
        r = evaluate_prompted(teacher, student, cfg, pipeline, prompts, digits, num_steps=pipeline.default_steps,
                              guidance_scale=pipeline.default_guidance, seed=0, batch_size=args.batch_size,
                              stem=os.path.join(workdir, f"{method}_prompts"))
        row["prompted"][method] = {k: r["student"].get(k) for k in ("accuracy", "fd", "fd_vs_teacher", "psnr")}
        row["prompted"][method]["frozen_accuracy"] = r["student_frozen"]["accuracy"]
        row["teacher"] = {k: r["teacher"][k] for k in ("accuracy", "fd")}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def summary(data: dict) -> str:
    import numpy as np

    from fraqat_jax.compare.stats import paired

    rows = data["seeds"]
    n = len(rows)
    if not n:
        return "no seeds yet"
    get = {
        "val_loss": lambda r, m: r["val_loss"][m],
        "fd": lambda r, m: r["prompted"][m]["fd"],
        "accuracy": lambda r, m: r["prompted"][m]["accuracy"],
    }
    teacher_acc = np.mean([r["teacher"]["accuracy"] for r in rows])
    lines = [f"{n} paired seeds ({', '.join(str(r['seed']) for r in rows)}); teacher prompted-digit accuracy "
             f"{teacher_acc:.3f} (mean), {data.get('num_prompts', 50)} held-out prompts per model",
             "",
             "| method | val loss (mean) | val loss / QAT [95% CI] | FD (mean) | FD / QAT [95% CI] | accuracy (mean) "
             "| accuracy - QAT [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        cells = [m]
        for metric in ("val_loss", "fd"):
            vals = [get[metric](r, m) for r in rows]
            ref = [get[metric](r, "qat") for r in rows]
            p = paired(vals, ref) if m != "qat" else None
            ci = p.get("ratio_ci") if p else None
            cells += [f"{np.mean(vals):.4g}",
                      "reference" if m == "qat" else (f"{p['ratio']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))]
        acc = [get["accuracy"](r, m) for r in rows]
        ref = [get["accuracy"](r, "qat") for r in rows]
        p = paired(acc, ref) if m != "qat" else None
        ci = p.get("diff_ci") if p else None
        cells += [f"{np.mean(acc):.3f}",
                  "reference" if m == "qat" else (f"{p['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1234-1243", help="seeds, e.g. 1234-1243 or 1234,1240")
    p.add_argument("--config", default=str(ROOT / "configs" / "sana_default.py"))
    p.add_argument("--workdir", default="runs/claim_sana")
    p.add_argument("--out", default="claim_sana_seeds.json")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--num-val", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=25, help="prompts per sampler call")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--summary", default=None, metavar="JSON", help="print the table of a results file and stop")
    p.add_argument("--smoke", action="store_true", help="4 steps, 64 validation inputs (a quick CPU check)")
    args = p.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            print(summary(json.load(f)))
        return 0
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        # every seed compiles the same programs: JAX's persistent cache compiles them once
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
    if args.smoke:
        args.steps, args.num_val = args.steps or 4, 64
    data = {"config": os.path.relpath(args.config, ROOT) if args.config.startswith(str(ROOT)) else args.config,
            "sets": args.set, "steps": args.steps, "num_prompts": 50, "seeds": []}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            data = json.load(f)
    done = {r["seed"] for r in data["seeds"]}
    for seed in parse_seeds(args.seeds):
        if seed in done:
            continue
        row = run_seed(seed, args)
        data["seeds"].append(row)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"seed {seed}: {json.dumps(row)}", flush=True)
    print(summary(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
