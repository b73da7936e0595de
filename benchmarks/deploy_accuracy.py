"""The text-to-image pipeline on the phone's runtime against the same pipeline in JAX, prompt by prompt.

Exports a trained text-to-image run (``configs/sana_default.py`` trained with ``--set
act_ranges=static``) with ``export --format qnn``, then for each prompt (seed = its index) makes
one image three ways from the same initial latents:

* ``qnn``: ``python -m fraqat_jax.deploy``'s own code path on QNN HTP (the simulator of the
  ``onnxruntime-qnn`` wheel, CPU fallback disabled);
* ``cpu``: the same runner on onnxruntime's CPU provider;
* ``jax``: the exported networks as the export quantized them, frozen, in JAX: the folder's
  tokenizer and constants, the family's own JAX sampler (flow DPM-Solver++ at the folder's shift).

It prints the prompted-digit accuracy of each (the shipped digits classifier on the images
box-averaged to 8x8, against the digit the prompt names), the PSNR of QNN against JAX and against
CPU per image (min and mean), and the ratio std(cond - uncond) QNN / JAX of the transformer's output
at every step of every prompt (min and max), then writes them as JSON (``--out``).

    python -m fraqat_jax.train --config configs/sana_default.py --workdir runs/sana_static --set act_ranges=static
    python benchmarks/deploy_accuracy.py --workdir runs/sana_static --folder runs/sana_static/qnn --num 20

Needs the qnn extra. The simulator is slow: about 20 s per prompt at 20 steps on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def psnr(a, b) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def balanced(prompts: list[str], digits: np.ndarray, num: int) -> list[int]:
    """``num`` indices of ``prompts``, round-robin over the digits they name, each digit's k-th pick
    its (k + digit)-th prompt (so the picks also spread over the file's templates)."""
    groups = {int(d): [i for i in range(len(prompts)) if digits[i] == d] for d in sorted(set(digits.tolist()))}
    order, k = [], 0
    while len(order) < min(num, len(prompts)):
        for d, group in groups.items():
            pick = group[(k + d) % len(group)]
            if len(order) < num and pick not in order:
                order.append(pick)
        k += 1
    return order


def jax_pipeline(report, folder: str, manifest: dict, steps: int, guidance: float):
    """``(prompt, seed) -> (image [C, H, W], per-step std(cond - uncond))`` of the exported networks in JAX."""
    import jax
    from flax import nnx

    import fraqat_jax
    from fraqat_jax.deploy import image as deploy_image
    from fraqat_jax.diffusion import model_sampler
    from fraqat_jax.export.onnx import static_view
    from fraqat_jax.export.qnn_pipeline import jitted

    encode = jitted(fraqat_jax.freeze(static_view(report["text_encoder"])))
    frozen = fraqat_jax.freeze(static_view(report["transformer"]))
    decode = jitted(fraqat_jax.freeze(static_view(report["vae_decoder"])))
    denoise = jitted(frozen)
    graphdef, state = nnx.split(frozen)
    sampler = model_sampler(lambda st: nnx.merge(graphdef, st).model, "sana", num_steps=steps,
                            guidance_scale=guidance, shift=manifest["sampler"]["shift"])
    null = np.load(os.path.join(folder, manifest["text"]["uncond_embedding"]))
    null_mask = np.load(os.path.join(folder, manifest["text"]["uncond_mask"])).astype(np.float32)
    uncond = {"encoder_hidden_states": null, "encoder_attention_mask": null_mask}

    def make(prompt: str, seed: int):
        ids, mask = deploy_image.tokenize(folder, manifest["text"], prompt)
        emb = encode({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.float32)})
        noise = np.random.default_rng(seed).standard_normal(manifest["latent"]["shape"]).astype(np.float32)
        cond = {"encoder_hidden_states": emb, "encoder_attention_mask": mask.astype(np.float32)}
        latent = np.asarray(sampler(state, noise, cond, jax.random.key(0), uncond))
        image = decode({"latent": latent / np.float32(manifest["latent"]["scaling_factor"])})[0]
        diffs = []  # the runner's loop with the JAX transformer: its cond - uncond per step
        deploy_image.sample(lambda f: {"sample": denoise(f)}, manifest, noise, cond, uncond, steps=steps,
                            guidance=guidance, on_step=lambda i, c, u: diffs.append(float(np.std(c - u))))
        return image, diffs

    return make


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a text-to-image run trained with act_ranges=static")
    p.add_argument("--folder", required=True, help="where export --format qnn writes the pipeline folder")
    p.add_argument("--prompts", default=os.path.join(ROOT, "benchmarks", "prompts", "sana_heldout.txt"))
    p.add_argument("--num", type=int, default=20, help="prompts, taken round-robin over the digits they name")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the folder's)")
    p.add_argument("--component-bits", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON of the figures (default FOLDER/deploy_accuracy.json)")
    args = p.parse_args(argv)

    from fraqat_jax import export
    from fraqat_jax.deploy import image as deploy_image
    from fraqat_jax.eval.classifier import DigitsClassifier
    from fraqat_jax.eval.prompted import box_average, prompt_digits, read_prompt_file

    every = read_prompt_file(args.prompts)
    picked = balanced(every, prompt_digits(every, args.prompts), args.num)
    prompts = [every[i] for i in picked]
    digits = prompt_digits(prompts, args.prompts)
    t0 = time.perf_counter()
    report = export.main(["--workdir", args.workdir, "--out", args.folder, "--format", "qnn",
                          "--component-bits", str(args.component_bits)])
    export_s = time.perf_counter() - t0
    with open(os.path.join(args.folder, "pipeline.json")) as f:
        manifest = json.load(f)
    steps = int(args.steps or manifest["sampler"]["steps"])
    guidance = float(manifest["sampler"]["guidance"])
    make_jax = jax_pipeline(report, args.folder, manifest, steps, guidance)
    images = {"qnn": [], "cpu": [], "jax": []}
    ratios, seconds = [], {"qnn": 0.0, "cpu": 0.0, "jax": 0.0}
    scratch = os.path.join(args.folder, "deploy_accuracy_png")
    os.makedirs(scratch, exist_ok=True)
    for i, prompt in enumerate(prompts):
        diffs = {}
        for provider in ("qnn", "cpu"):
            run_args = argparse.Namespace(folder=args.folder, prompt=prompt, label=None, seed=i, provider=provider,
                                          out=os.path.join(scratch, f"{i:02d}_{provider}.png"), steps=steps,
                                          guidance=None)
            diffs[provider] = []
            start = time.perf_counter()
            images[provider].append(deploy_image.run(manifest, args.folder, run_args,
                                                     on_step=lambda k, c, u, d=diffs[provider]: d.append(float(np.std(c - u)))))
            seconds[provider] += time.perf_counter() - start
        start = time.perf_counter()
        image, diffs["jax"] = make_jax(prompt, i)
        seconds["jax"] += time.perf_counter() - start
        images["jax"].append(image)
        ratios.extend(np.asarray(diffs["qnn"]) / np.asarray(diffs["jax"]))
        print(f"[{i + 1}/{len(prompts)}] {prompt!r}: PSNR QNN vs JAX {psnr(images['qnn'][-1], image):.1f} dB, "
              f"vs CPU {psnr(images['qnn'][-1], images['cpu'][-1]):.1f} dB", flush=True)

    classifier = DigitsClassifier.load()
    stacked = {k: np.stack(v) for k, v in images.items()}
    accuracy = {k: float(np.mean(classifier.predict(box_average(v)) == digits)) for k, v in stacked.items()}
    vs_jax = [psnr(a, b) for a, b in zip(stacked["qnn"], stacked["jax"])]
    vs_cpu = [psnr(a, b) for a, b in zip(stacked["qnn"], stacked["cpu"])]
    result = {"prompts": len(prompts), "prompt_file": os.path.abspath(args.prompts), "steps": steps,
              "guidance": guidance, "component_bits": args.component_bits, "accuracy": accuracy,
              "accuracy_qnn_minus_jax": accuracy["qnn"] - accuracy["jax"],
              "psnr_qnn_vs_jax": {"min": min(vs_jax), "mean": float(np.mean(vs_jax))},
              "psnr_qnn_vs_cpu": {"min": min(vs_cpu), "mean": float(np.mean(vs_cpu))},
              "std_ratio_qnn_over_jax": {"min": float(np.min(ratios)), "max": float(np.max(ratios))},
              "export_seconds": round(export_s, 1), "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    print(f"prompted-digit accuracy over {len(prompts)} prompts ({steps} steps, guidance {guidance:g}): "
          f"QNN {accuracy['qnn']:.2f}, CPU provider {accuracy['cpu']:.2f}, JAX {accuracy['jax']:.2f} "
          f"(QNN - JAX {result['accuracy_qnn_minus_jax']:+.2f})")
    print(f"PSNR QNN vs JAX: min {min(vs_jax):.1f} dB, mean {np.mean(vs_jax):.1f} dB; QNN vs CPU provider: min "
          f"{min(vs_cpu):.1f} dB, mean {np.mean(vs_cpu):.1f} dB")
    print(f"std(cond - uncond) QNN / JAX over every step: {np.min(ratios):.3f} .. {np.max(ratios):.3f}")
    print(f"seconds: export {export_s:.0f}, QNN runs {seconds['qnn']:.0f}, CPU runs {seconds['cpu']:.0f}, "
          f"JAX {seconds['jax']:.0f}")
    out = args.out or os.path.join(args.folder, "deploy_accuracy.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
