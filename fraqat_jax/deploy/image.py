"""The image runner: a prompt (or a class label) to a PNG with the networks of a pipeline folder.

The order of calls, which an app ports one for one (docs/deploy.md):

1. **Conditioning.** A text folder: tokenize the prompt (``tokenizer.json``), pad to the manifest's
   text length, run ``text_encoder`` once (``input_ids``, ``attention_mask`` -> the embedding);
   the empty prompt's embedding and mask for guidance are constants of the folder (``.npy``).
   A label folder: the label itself, and the null label for guidance.
2. **Noise**: ``numpy.random.default_rng(seed).standard_normal(latent shape)``, float32.
3. **The sampler loop** (``sampler`` of the manifest): per step, the ``transformer`` at batch 1 on
   the conditional input and, with guidance, once more on the unconditional one;
   ``out = uncond + guidance * (cond - uncond)``; the scheduler's update of the latent.
4. **Decode**: ``vae_decoder`` on ``latent / scaling_factor`` (a folder without a decoder samples
   pixels directly).
5. **PNG**: ``pixel = (x + 1) / 2 * 255``, rounded and clipped; one image, no border.

Schedulers (the manifest's ``sampler.name``): ``ddim`` (epsilon prediction, deterministic, diffusers'
"leading" timesteps over ``num_train_timesteps``), ``flow_euler`` (rectified flow, the SD3 sigmas
with ``shift``) and ``flow_dpmsolver++`` (rectified flow, second-order multistep DPM-Solver++ in the
data prediction, diffusers' ``DPMSolverMultistepScheduler`` with flow sigmas, the final step first order onto sigma 0).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from fraqat_jax.deploy.common import DeployError, Timer, load_component

__all__ = ["SCHEDULERS", "add_arguments", "ddim_schedule", "dpm_flow_sigmas", "flow_sigmas", "png_pixels", "run", "sample",
           "step_fn", "write_png"]

SCHEDULERS = ("ddim", "flow_euler", "flow_dpmsolver++")
_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
           "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


def add_arguments(p) -> None:
    p.add_argument("--label", type=int, default=None, help="class label (a class-conditional folder)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the manifest's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the manifest's)")


# ----------------------------------------------------------------------------- schedules


def ddim_schedule(settings: Mapping, steps: int):
    """``(timesteps, alpha_cumprod at them, alpha_cumprod after them)`` of deterministic DDIM."""
    n = int(settings.get("num_train_timesteps", 1000))
    lo, hi, kind = float(settings.get("beta_start", 1e-4)), float(settings.get("beta_end", 0.02)), settings.get(
        "beta_schedule", "linear")
    if kind == "linear":
        betas = np.linspace(lo, hi, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(lo**0.5, hi**0.5, n, dtype=np.float64) ** 2
    else:
        raise DeployError(f"unknown beta_schedule {kind!r} in pipeline.json; allowed: linear, scaled_linear")
    acp = np.cumprod(1.0 - betas)
    ts = (np.arange(steps, dtype=np.int64) * (n // steps))[::-1]
    return ts, acp[ts], np.concatenate([acp[ts[1:]], [1.0]])


def flow_sigmas(settings: Mapping, steps: int) -> np.ndarray:
    """Descending noise levels from 1, then 0 (``steps + 1``), with the time shift of ``settings``."""
    shift, n = float(settings.get("shift", 1.0)), int(settings.get("num_train_timesteps", 1000))
    shifted = lambda q: shift * q / (1 + (shift - 1) * q)  # noqa: E731
    s = np.linspace(1.0, shifted(1.0 / n), steps, dtype=np.float64)
    return np.concatenate([shifted(s), [0.0]])


def dpm_flow_sigmas(settings: Mapping, steps: int) -> np.ndarray:
    """DPM-Solver++'s flow sigmas (diffusers' ``use_flow_sigmas``): ``1 - linspace(1, 1/n, steps + 1)``
    time-shifted, descending, the last dropped, then a final 0."""
    shift, n = float(settings.get("shift", 1.0)), int(settings.get("num_train_timesteps", 1000))
    s = 1.0 - np.linspace(1.0, 1.0 / n, steps + 1, dtype=np.float64)
    s = (shift * s / (1 + (shift - 1) * s))[::-1][:-1]
    return np.concatenate([s, [0.0]])


def step_fn(settings: Mapping, steps: int):
    """``(model timesteps, update)`` for the manifest's scheduler: ``update(i, x, out) -> x`` is the
    scheduler's step ``i`` given the (guided) model output ``out``."""
    name = settings.get("name")
    if name == "ddim":
        ts, a_t, a_prev = ddim_schedule(settings, steps)

        def update(i, x, eps):
            x0 = (x - np.sqrt(1 - a_t[i]) * eps) / np.sqrt(a_t[i])
            return (np.sqrt(a_prev[i]) * x0 + np.sqrt(1 - a_prev[i]) * eps).astype(np.float32)

        return ts.astype(np.float32), update
    if name not in ("flow_euler", "flow_dpmsolver++"):
        raise DeployError(f"unknown sampler {name!r} in pipeline.json; allowed: {', '.join(SCHEDULERS)}")
    sig = flow_sigmas(settings, steps) if name == "flow_euler" else dpm_flow_sigmas(settings, steps)
    times = sig[:-1] * float(settings.get("timesteps_per_sigma", 1000.0))
    if name == "flow_euler":
        times = times.astype(np.float32)
        return times, lambda i, x, v: (x + (sig[i + 1] - sig[i]) * v).astype(np.float32)
    times = np.trunc(times).astype(np.float32)  # diffusers passes integer timesteps (int64) here
    previous = []  # data predictions of the earlier steps (multistep)

    def update(i, x, v):
        # DPM-Solver++ on x_s = (1 - s) x0 + s noise: alpha = 1 - s, lambda = log(alpha / s).
        x0 = x - sig[i] * v
        previous.append(x0)
        s, s_next = sig[i], sig[i + 1]
        if s_next == 0:  # the final step (first order onto sigma 0) lands on the data prediction
            return x0.astype(np.float32)
        lam = lambda q: np.log((1 - q) / q)  # noqa: E731
        h = lam(s_next) - lam(s)
        d = x0
        if len(previous) > 1:
            h_prev = lam(s) - lam(sig[i - 1])
            r = h_prev / h
            d = x0 + (x0 - previous[-2]) / (2 * r)
        return ((s_next / s) * x - (1 - s_next) * np.expm1(-h) * d).astype(np.float32)

    return times, update


# ----------------------------------------------------------------------------- the run


def _typed(component, feeds: Mapping[str, np.ndarray]) -> dict:
    """``feeds`` cast to the dtypes the component's graph declares."""
    types = {i.name: _DTYPES.get(i.type, np.float32) for i in component.session.get_inputs()}
    if component.prologue is not None:
        types.update({i.name: _DTYPES.get(i.type, np.float32) for i in component.prologue.get_inputs()})
    return {k: np.asarray(v, types.get(k, np.asarray(v).dtype)) for k, v in feeds.items()}


def sample(transformer, manifest: Mapping, noise: np.ndarray, cond: Mapping, uncond: Mapping | None, *,
           steps: int, guidance: float, timer: Timer | None = None, on_step=None) -> np.ndarray:
    """The sampler loop: ``transformer`` (a :class:`~fraqat_jax.deploy.common.Component`, or any
    ``feeds -> {name: output}``) at batch 1, twice per step with guidance. ``cond`` / ``uncond``:
    the conditioning feeds. ``on_step(i, out_cond, out_uncond)`` sees each step's outputs."""
    io = manifest["transformer_io"]
    times, update = step_fn(manifest["sampler"], steps)
    x = noise.astype(np.float32)
    channels = x.shape[1]
    timer = timer or Timer()
    for i in range(steps):
        with timer("step"):
            t = np.full((x.shape[0],), times[i], np.float32)
            feeds = {io["latent"]: x, io["timestep"]: t}
            with timer("transformer"):
                out_c = transformer({**feeds, **cond})[io["output"]][:, :channels]
            out_u = None
            if guidance != 1.0:
                with timer("transformer"):
                    out_u = transformer({**feeds, **uncond})[io["output"]][:, :channels]
                out = out_u + guidance * (out_c - out_u)
            else:
                out = out_c
            if on_step is not None:
                on_step(i, out_c, out_u)
            x = update(i, x, out.astype(np.float32))
    return x


def png_pixels(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in [-1, 1] -> ``(H, W)`` or ``(H, W, 3)`` uint8, ``(x + 1) / 2 * 255``."""
    pixels = np.clip(np.round((np.asarray(image, np.float64) + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))


def write_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(png_pixels(image)).save(path, format="PNG")


def _check(manifest: Mapping, args) -> tuple[int, float]:
    mode = manifest.get("conditioning")
    if mode == "label":
        if args.label is None or args.prompt is not None:
            raise DeployError("this folder is class-conditional: give --label K (not --prompt)")
        n = int(manifest["label"]["num_classes"])
        if not 0 <= args.label < n:
            raise DeployError(f"--label must be in [0, {n - 1}], got {args.label}")
    elif mode == "text":
        if args.prompt is None or args.label is not None:
            raise DeployError("this folder is text-conditional: give --prompt TEXT (not --label)")
    else:
        raise DeployError(f"pipeline.json has conditioning {mode!r}; allowed: label, text")
    steps = manifest["sampler"].get("steps", 20) if args.steps is None else args.steps
    if steps < 1:
        raise DeployError(f"--steps must be >= 1, got {steps}")
    guidance = float(manifest["sampler"].get("guidance", 1.0) if args.guidance is None else args.guidance)
    if not np.isfinite(guidance):
        raise DeployError(f"--guidance must be a finite number, got {guidance}")
    if not args.out:
        raise DeployError("give --out IMAGE.png: the file the image is written to")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise DeployError(f"cannot write --out {args.out!r}: {parent!r} is not a folder")
    return int(steps), guidance


def tokenize(folder: str, text_settings: Mapping, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` ``(1, length)`` int64: the tokenizer's ids (special tokens
    included; the prompt lower-cased and stripped first when the settings say ``lowercase``),
    padded with ``pad_id`` to the text length; :class:`DeployError` when longer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, text_settings["tokenizer"]))
    tok.no_padding()
    tok.no_truncation()
    if text_settings.get("lowercase"):  # the pipeline's text preprocessing (Sana: lower().strip())
        prompt = prompt.lower().strip()
    ids = tok.encode(prompt).ids
    length = int(text_settings["length"])
    if len(ids) > length:
        raise DeployError(f"--prompt is {len(ids)} tokens, longer than the folder's text length {length}")
    mask = [1] * len(ids) + [0] * (length - len(ids))
    ids = ids + [int(text_settings["pad_id"])] * (length - len(ids))
    return np.asarray([ids], np.int64), np.asarray([mask], np.int64)


def conditioning(folder: str, manifest: Mapping, args, provider: str, timer: Timer):
    """``(cond, uncond)`` feeds of the transformer for the prompt or label of ``args``."""
    io = manifest["transformer_io"]
    if manifest["conditioning"] == "label":
        label = manifest["label"]
        return ({label["input"]: np.asarray([args.label])}, {label["input"]: np.asarray([label["null"]])})
    if "text" not in manifest or "text_encoder" not in manifest.get("components", {}):
        raise DeployError(f"{folder!r} has no text encoder (component 'text_encoder' is missing): a text-conditional "
                          "transformer exported alone cannot turn a prompt into its input")
    text = manifest["text"]
    ids, mask = tokenize(folder, text, args.prompt)
    with timer("load text_encoder"):
        encoder = load_component(folder, manifest, "text_encoder", provider)
    with timer("text_encoder"):
        feeds = _typed(encoder, {text["ids_input"]: ids, text["mask_input"]: mask})
        emb = encoder(feeds)[text["output"]]
    null_emb = np.load(os.path.join(folder, text["uncond_embedding"]))
    null_mask = np.load(os.path.join(folder, text["uncond_mask"]))
    cond, uncond = {io["text"]: emb}, {io["text"]: null_emb}
    if io.get("text_mask"):  # a transformer that takes the caption mask
        cond[io["text_mask"]], uncond[io["text_mask"]] = mask, null_mask
    return cond, uncond


def run(manifest: Mapping, folder: str, args, on_step=None) -> np.ndarray:
    """Writes the PNG of ``args`` (see :func:`~fraqat_jax.deploy.__main__.main`); returns the image
    ``(C, H, W)`` in the model's range. ``on_step``: as :func:`sample`'s."""
    steps, guidance = _check(manifest, args)
    provider = args.provider
    timer = Timer()
    with timer("load transformer"):
        transformer = load_component(folder, manifest, "transformer", provider)
    decoder = None
    if "vae_decoder" in manifest["components"]:
        with timer("load vae_decoder"):
            decoder = load_component(folder, manifest, "vae_decoder", provider)
    cond, uncond = conditioning(folder, manifest, args, provider, timer)
    cond, uncond = _typed(transformer, cond), _typed(transformer, uncond)
    shape = tuple(manifest["latent"]["shape"])
    noise = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    x = sample(lambda f: transformer(_typed(transformer, f)), manifest, noise, cond, uncond, steps=steps,
               guidance=guidance, timer=timer, on_step=on_step)
    if decoder is not None:
        latent = manifest["latent"]
        z = x / np.float32(latent.get("scaling_factor", 1.0))
        with timer("vae_decoder"):
            x = decoder({manifest["vae_io"]["latent"]: z})[manifest["vae_io"]["output"]]
    image = x[0]
    write_png(image, args.out)
    print(f"wrote {args.out}: {image.shape[-2]}x{image.shape[-1]}, {steps} steps, guidance {guidance:g}, "
          f"provider {provider}")
    for line in timer.lines():
        print(line)
    return image
