"""``python -m fraqat_jax.generate``: generate with a run (or an orbax export), whatever its family.

Text runs::

    python -m fraqat_jax.generate --workdir RUN --prompt TEXT | --prompts FILE \\
        [--model teacher|student|frozen] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] \\
        [--seed S] [--stop STR ...] [--chat] [--out FILE]

``--prompts FILE``: UTF-8, one prompt per line (batched, left-padded). Greedy unless
``--temperature`` > 0. Stops on the end tokens (``generation_config.json``, ``<end_of_turn>``;
else ``config.json``'s ``eos_token_id``) and on the ``--stop`` strings. ``--chat`` applies the
tokenizer's chat template. Prints each continuation; ``--out FILE`` writes JSON lines ``{"prompt",
"text", "tokens"}`` (the continuation only, special tokens skipped).

Class-conditional diffusion runs: ``--label L ...`` with ``--steps``, ``--guidance``, ``--seed``;
``--out DIR`` (default ``RUN/generated``) receives one PNG per image, pixel ``(x + 1) / 2 * 255``.

Bad input (no run, a run without a tokenizer, an empty prompt file, ``--top-p 2``, a prompt
longer than the cache) prints one line and exits 2.
"""

from __future__ import annotations

import os
import sys

from fraqat_jax.cli import Parser, fail
from fraqat_jax.family import ConfigError
from fraqat_jax.generate import MODELS, load_model, write_jsonl, write_pngs


def _parser() -> Parser:
    p = Parser(prog="python -m fraqat_jax.generate", description="Generate with a run's teacher or student.")
    p.add_argument("--workdir", required=True, help="a run's workdir, or an orbax export folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (text runs; repeatable)")
    p.add_argument("--prompts", help="a UTF-8 file of prompts, one per line")
    p.add_argument("--model", default="student", choices=MODELS, help="which model of the run (default student)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default the latest)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: no cut")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1: no cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", action="extend", default=[], help="stop strings")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--label", nargs="+", action="extend", type=int, default=[], help="class labels (diffusion)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (diffusion; default the run's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (diffusion)")
    p.add_argument("--out", help="text: a JSON-lines file; diffusion: a folder of PNGs")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts {args.prompts!r} cannot be read as UTF-8 text: {e}")
        lines = [line for line in lines if line.strip()]
        if not lines:
            fail(f"--prompts {args.prompts!r} holds no prompt: write one prompt per line")
        prompts += lines
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 < args.top_p <= 1:
        fail(f"--top-p {args.top_p:g} is not allowed: use a number in (0, 1]")
    if args.top_k < 0 or args.temperature < 0 or args.max_new_tokens < 1:
        fail(f"--top-k {args.top_k} / --temperature {args.temperature:g} / --max-new-tokens {args.max_new_tokens}"
             " not allowed: top-k >= 0, temperature >= 0, max-new-tokens >= 1")
    prompts = _prompts(args)
    if any(not p for p in prompts):
        fail("--prompt is empty: give some text")
    try:
        model, cfg, family = load_model(args.workdir, args.model, step=args.step)
        generates = getattr(family, "generates", frozenset())
        if "text" in generates:
            if args.label:
                fail(f"--label is for class-conditional image runs; {args.workdir!r} generates text")
            if not prompts:
                fail("give --prompt TEXT or --prompts FILE")
            out = family.generate_text(model, cfg, prompts, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                                       top_p=args.top_p, stop=args.stop, chat=args.chat)
            for completion in out:
                print(completion)
            if args.out:
                write_jsonl(args.out, out)
            return 0
        if args.chat or args.stop:
            fail(f"--chat and --stop are for text runs; {args.workdir!r} generates images")
        images = family.generate_images(model, cfg, labels=args.label or None, prompts=prompts or None,
                                        num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        names = ([f"{i:03d}_label{label}" for i, label in enumerate(args.label)] if args.label
                 else [f"{i:03d}_prompt" for i in range(len(images))])
        for path in write_pngs(args.out or os.path.join(args.workdir, "generated"), images, names):
            print(path)
        return 0
    except (ConfigError, ValueError) as e:
        fail(e)


if __name__ == "__main__":
    sys.exit(main())
