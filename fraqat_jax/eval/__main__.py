"""``python -m fraqat_jax.eval --workdir DIR``: scores a trained student against its teacher.

Loads the run's teacher and final (or ``--step``) student with ``fraqat_jax.runs.load_run``, samples
both from the same noise and writes ``DIR/eval.json`` (see :mod:`fraqat_jax.eval.evaluate` for the
metrics). Text-to-image runs: ``--prompts CACHE --vae DIR`` samples both on the prompts of a prompt
cache (``scripts/cache_latents.py --prompts``) with the pipeline's sampler settings, decodes them with
the pipeline's VAE in JAX and writes the teacher-above-student PNGs next to ``eval.json`` (see
:mod:`fraqat_jax.eval.t2i`), sharded over ``--mesh``. Bad input (no run in DIR, no checkpoint, a
missing Inception weights file, an unwritable output, a prompt cache or VAE that does not fit the
teacher) exits with status 2 and one line on stderr.

A run whose teacher is a whole prompt-to-image pipeline (text encoder, transformer, autoencoder; e.g.
``builtin:sana``): ``--prompts FILE`` (UTF-8, one prompt naming a digit per line) encodes the prompts
with the run's own text encoder, samples the teacher, the student and its frozen integer form from
the same noise, decodes with the run's own autoencoder and writes ``teacher``, ``student`` and
``student_frozen`` objects (``accuracy`` on the prompted digits, ``fd``, ``psnr``) and a picture
grid (see :mod:`fraqat_jax.eval.prompted`). An empty or non-UTF-8 file, a prompt naming no digit and a
run whose teacher has no text encoder exit 2.

Language-model runs (a Gemma-2 teacher): ``--tasks SPEC[,SPEC...] [--text FILE]`` scores the teacher,
the student as trained (W4A8 fake quant) and its frozen integer form on multiple-choice tasks with
lm-eval's rule, and their perplexity and the student's KL to the teacher on ``--text`` (one sequence
per line; default: the run's held-out windows). ``eval.json`` then holds exactly ``tasks`` (task ->
model -> ``acc``, ``acc_norm``, ``n``), ``perplexity`` (model -> value) and ``kl``; see
:mod:`fraqat_jax.eval.text`. A bad task spec or file exits 2 before the run is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fraqat_jax.cli import Parser, fail


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fraqat_jax.eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run directory written by python -m fraqat_jax.train")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to score (default: the latest)")
    p.add_argument("--ema", action="store_true", help="score the EMA weights (if the run kept them)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per model (default 500; with --prompts: one per prompt of the cache)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="sampler steps (default: the run's sample_steps; with --prompts: the pipeline's, e.g. SD3 28)")
    p.add_argument("--num-val", type=int, default=512, help="held-out inputs for the validation loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise and validation inputs")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (1: none; default 1, with --prompts the pipeline's, e.g. SD3 7.0)")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception weights (pytorch-fid .pth, .npz or .safetensors) for image samples")
    p.add_argument("--out", default=None, help="output file (default: WORKDIR/eval.json)")
    t = p.add_argument_group("text-to-image (latent teachers: SD3, PixArt, Sana, Flux)")
    t.add_argument("--prompts", metavar="FILE|CACHE", default=None,
                   help="a UTF-8 text file, one prompt naming a digit per line, for a run whose teacher is a whole "
                        "pipeline (e.g. builtin:sana): encoded by its text encoder, decoded by its autoencoder, scored "
                        "by prompted-digit accuracy, FD and PSNR; or a prompt cache written by "
                        "scripts/cache_latents.py --prompts (with --vae): sample teacher and student on its prompts")
    t.add_argument("--vae", metavar="DIR", default=None,
                   help="the pipeline's vae/ folder (or the pipeline folder) to decode the samples with (needs "
                        "--prompts; optional with a prompt file: the run's own autoencoder by default)")
    t.add_argument("--shift", type=float, default=None,
                   help="time shift of the flow sampler (default: the scheduler config in the prompt cache or the "
                        "run's pipeline, else SD3 3.0)")
    t.add_argument("--batch-size", type=int, default=8, help="prompts sampled at once, over the whole mesh (default 8)")
    t.add_argument("--mesh", default="", metavar="SPEC",
                   help="device mesh like the trainer's, e.g. data=8 or data=4,fsdp=2 (default: data over every device)")
    t.add_argument("--images-dir", default=None,
                   help="where the PNGs and captions.jsonl go (default: OUT without .json plus _images, e.g. WORKDIR/eval_images)")
    t.add_argument("--save-arrays", action="store_true",
                   help="also write the latents and decoded images of both models to IMAGES_DIR/arrays.npz")
    x = p.add_argument_group("text (language-model runs: Gemma-2 teachers)")
    x.add_argument("--tasks", metavar="SPEC[,SPEC...]", default=None,
                   help="multiple-choice tasks scored with lm-eval's rule: mc:FILE (JSONL context/choices/gold), "
                        "boolq:FILE (super_glue BoolQ rows), commonsense_qa:FILE (CommonsenseQA rows)")
    x.add_argument("--text", metavar="FILE", default=None,
                   help="perplexity and KL on this text, one sequence per line (default: the run's held-out windows)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.workdir):
        fail(f"--workdir {args.workdir!r} does not exist")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        fail(f"--inception-weights {args.inception_weights!r} is not a file")
    prompt_file = args.prompts is not None and not os.path.isdir(args.prompts)
    cache_without_vae = args.prompts is not None and not prompt_file and args.vae is None
    if (args.vae is not None and args.prompts is None) or cache_without_vae:
        fail("--prompts and --vae go together: a prompt cache to sample on and the VAE to decode with")
    if args.prompts is None and args.num_samples is None:
        args.num_samples = 500
    if args.prompts is None and (args.num_samples < 2 or args.num_val < 1):
        fail(f"--num-samples must be >= 2 and --num-val >= 1, got {args.num_samples} and {args.num_val}")
    if args.prompts is not None and ((args.num_samples is not None and args.num_samples < 1) or args.batch_size < 1):
        fail(f"--num-samples and --batch-size must be >= 1, got {args.num_samples} and {args.batch_size}")
    if args.prompts is not None and not os.path.exists(args.prompts):
        fail(f"--prompts {args.prompts!r}: no such folder (a prompt-embedding cache) or file (UTF-8, one prompt "
             "per line)")
    if prompt_file:
        from fraqat_jax.eval.prompted import PromptsError, prompt_digits, read_prompt_file

        try:
            prompts = read_prompt_file(args.prompts)
            digits = prompt_digits(prompts, repr(args.prompts))
        except PromptsError as e:
            fail(str(e))
    out_path = args.out or os.path.join(args.workdir, "eval.json")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        fail(f"cannot write {out_path!r}: {out_dir!r} is not a writable directory")

    if args.tasks is not None or args.text is not None:
        from fraqat_jax.eval.text import TaskError, parse_specs, read_lines, read_task

        try:
            specs = parse_specs(args.tasks) if args.tasks is not None else []
            for spec in specs:
                read_task(spec)
            if args.text is not None:
                read_lines(args.text)
        except TaskError as e:
            fail(str(e))

    from fraqat_jax import runs
    from fraqat_jax.eval.evaluate import Evaluator
    from fraqat_jax.nn import bits_of

    try:
        teacher, student, cfg = runs.load_run(args.workdir, step=args.step, ema=args.ema)
    except (ValueError, FileNotFoundError) as e:
        fail(f"no trained student in {args.workdir!r}: {e}")
    t0 = time.perf_counter()
    from fraqat_jax.data import DataSourceError
    from fraqat_jax.family import family_for_model

    if prompt_file:
        return _evaluate_prompted(args, teacher, student, cfg, out_path, t0, prompts, digits)
    if family_for_model(teacher).evaluation == "text":
        return _evaluate_text(args, teacher, student, cfg, out_path, t0)
    if args.tasks is not None or args.text is not None:
        fail(f"--tasks and --text apply to language-model runs; {args.workdir!r} distils {type(teacher).__name__}")

    if args.prompts is not None:
        result = {"workdir": os.path.abspath(args.workdir), "step": args.step or _latest_step(args.workdir),
                  "schedule": cfg.schedule, "bits": _bits(student, bits_of),
                  **_evaluate_t2i(args, teacher, student, cfg, out_path)}
        return _write(result, out_path, t0, ("bits", "latent_mse", "mse", "psnr", "fid"))
    if args.guidance_scale is None:
        args.guidance_scale = 1.0
    try:
        ev = Evaluator(teacher, cfg, num_samples=args.num_samples, sample_steps=args.sample_steps,
                       num_val=args.num_val, seed=args.seed, guidance_scale=args.guidance_scale,
                       inception_weights=args.inception_weights)
    except DataSourceError as e:  # the run's data (or --set data=...) cannot be opened here
        fail(str(e))
    result = {"workdir": os.path.abspath(args.workdir), "step": args.step or _latest_step(args.workdir), "schedule": cfg.schedule,
              "bits": _bits(student, bits_of), **ev.evaluate(student), **ev.settings()}
    return _write(result, out_path, t0, ("bits", "val_loss", "fd", "mse", "psnr", "accuracy", "teacher_accuracy"))


def _write(result: dict, out_path: str, t0: float, shown_keys) -> dict:
    result["seconds"] = round(time.perf_counter() - t0, 2)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    shown = {k: result[k] for k in shown_keys if isinstance(result.get(k), (int, float))}
    print(" ".join(f"{k}={v:.6g}" for k, v in shown.items()) + f" -> {out_path}")
    return result


def _evaluate_text(args, teacher, student, cfg, out_path: str, t0: float) -> dict:
    """A language-model run: ``tasks``, ``perplexity`` and ``kl`` (see :mod:`fraqat_jax.eval.text`)."""
    from fraqat_jax.data import DataSourceError
    from fraqat_jax.eval.text import TaskError, evaluate_run, parse_specs

    try:
        result = evaluate_run(teacher, student, cfg, specs=parse_specs(args.tasks) if args.tasks else [],
                              text=args.text, batch_size=args.batch_size)
    except (TaskError, DataSourceError) as e:
        fail(str(e))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    ppl = result["perplexity"]
    shown = [f"{name}: " + " ".join(f"{m}={v['acc']:.3f}" for m, v in row.items()) for name, row in result["tasks"].items()]
    print("; ".join(shown + [f"perplexity teacher={ppl['teacher']:.4g} student={ppl['student']:.4g} "
                             f"student_frozen={ppl['student_frozen']:.4g}", f"kl={result['kl']:.4g}"])
          + f" ({time.perf_counter() - t0:.0f}s) -> {out_path}")
    return result


def _evaluate_prompted(args, teacher, student, cfg, out_path: str, t0: float, prompts, digits) -> dict:
    """``--prompts FILE``: the run's own pipeline encodes, samples and decodes (see
    :mod:`fraqat_jax.eval.prompted`); a teacher that is no whole pipeline exits 2."""
    from fraqat_jax.eval.prompted import MODELS, evaluate_prompted
    from fraqat_jax.family import family_for_model
    from fraqat_jax.nn import bits_of

    family = family_for_model(teacher)
    if not hasattr(family, "prompt_pipeline"):
        fail(f"--prompts {args.prompts!r} needs a run whose teacher has a text encoder and an autoencoder; "
             f"{args.workdir!r} distils {type(teacher).__name__} ({cfg.teacher!r})")
    try:
        pipeline = family.prompt_pipeline(cfg, vae=args.vae)
    except (ValueError, OSError) as e:
        fail(f"--prompts {args.prompts!r}: {e}")
    if args.shift is not None:
        pipeline.shift = float(args.shift)
    stem = os.path.splitext(os.path.abspath(out_path))[0] + "_prompts"
    result = evaluate_prompted(
        teacher, student, cfg, pipeline, prompts, digits, num_samples=args.num_samples,
        num_steps=args.sample_steps or pipeline.default_steps,
        guidance_scale=pipeline.default_guidance if args.guidance_scale is None else args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, stem=stem, save_arrays=args.save_arrays)
    result = {"workdir": os.path.abspath(args.workdir), "step": args.step or _latest_step(args.workdir),
              "schedule": cfg.schedule, "bits": _bits(student, bits_of), "prompts": os.path.abspath(args.prompts),
              **result, "seconds": round(time.perf_counter() - t0, 2)}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    shown = " ".join(f"{m}: accuracy={result[m]['accuracy']:.3f} fd={result[m]['fd']:.4g}"
                     + (f" psnr={result[m]['psnr']:.2f}" if result[m].get("psnr") is not None else "") for m in MODELS)
    print(f"{shown} -> {out_path}")
    return result


def _evaluate_t2i(args, teacher, student, cfg, out_path: str) -> dict:
    """``--prompts``/``--vae``: checks both against the teacher (exit 2 naming both sides), lays the
    models out on ``--mesh`` and runs :class:`fraqat_jax.eval.t2i.T2IEvaluator`."""
    import jax

    from fraqat_jax.data import DataSourceError, read_latents
    from fraqat_jax.data.latents import read_prompts
    from fraqat_jax.eval import t2i
    from fraqat_jax.family import family_for_model
    from fraqat_jax.models import load_vae
    from fraqat_jax.parallel import mesh as mesh_lib

    family, teacher_name = family_for_model(teacher), repr(cfg.teacher)
    try:
        prompts = read_prompts(args.prompts)
        t2i.check_prompts(prompts, repr(args.prompts), teacher.config, family, teacher_name)
        if not os.path.isdir(args.vae):
            raise t2i.T2IInputError(f"--vae {args.vae!r} is not a folder; give the vae/ folder of the teacher's pipeline")
        vae_dir = t2i.resolve_vae_dir(args.vae)
        t2i.check_vae_config(vae_dir, teacher.config, family, teacher_name)
        mesh = mesh_lib.build_mesh(args.mesh)
    except (DataSourceError, t2i.T2IInputError, mesh_lib.MeshError) as e:
        fail(str(e))
    try:
        vae = load_vae(vae_dir)
    except (ValueError, OSError) as e:  # weights that do not match the config
        fail(f"--vae {vae_dir!r} cannot be loaded: {e}")
    data_shape = None
    if cfg.data.startswith("latents:"):
        try:
            data_shape = read_latents(cfg.data[len("latents:"):]).element_spec["latents"][0]
        except DataSourceError:
            pass  # the run's cache moved: the teacher's sample_size decides
    inception = None
    if args.inception_weights:
        from fraqat_jax.eval.inception import inception_feature_fn, load_inception

        inception = inception_feature_fn(load_inception(args.inception_weights))
    sharding = t2i.Sharding(batch=lambda ndim: mesh_lib.batch_sharding(mesh, ndim),
                            params=lambda state: mesh_lib.shard_params(state, mesh),
                            batch_divisor=int(mesh.shape["data"] * mesh.shape["fsdp"]))
    settings = t2i.settings_for(family, prompts.info, sample_steps=args.sample_steps,
                                guidance_scale=args.guidance_scale, shift=args.shift)
    ev = t2i.T2IEvaluator(teacher, vae, prompts, latent_shape=t2i.latent_shape(family, teacher.config, data_shape),
                          settings=settings, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                          inception=inception, sharding=sharding)
    stem = os.path.splitext(os.path.abspath(out_path))[0]
    images_dir = args.images_dir or f"{stem}_images"
    out = ev.evaluate(student, images_dir, save_arrays=args.save_arrays, write=jax.process_index() == 0)
    return {**out, "prompts": os.path.abspath(args.prompts), "vae": os.path.abspath(vae_dir), "mesh": dict(mesh.shape)}


def _latest_step(workdir):
    from fraqat_jax.runs import checkpoint_steps

    steps = checkpoint_steps(workdir)
    return steps[-1] if steps else None


def _bits(student, bits_of):
    try:
        values = sorted({float(b) for b in bits_of(student).values() if b is not None})
    except Exception:
        return None
    return values[0] if len(values) == 1 else values or None


if __name__ == "__main__":
    main()
