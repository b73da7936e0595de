"""Samplers for the students and teachers: DDPM / DDIM (epsilon prediction) and Euler (rectified flow).

Every sampler takes a *model function* ``model_fn(x, t, cond) -> out`` where

- ``x``: the noisy sample, shape ``(B, C, H, W)`` (diffusers layout; the channel axis is
  ``channel_axis``, 1 by default);
- ``t``: float32 timesteps, shape ``(B,)``, in the units the model was trained with: DDPM
  timestep indices ``0 .. num_train_timesteps - 1`` for epsilon models, ``1000 * sigma`` for
  rectified flow (as diffusers' ``FlowMatchEulerDiscreteScheduler`` passes them to SD3);
- ``cond``: any pytree whose leaves have the batch on axis 0 (class labels, text embeddings).

The output's first ``C`` channels are used (epsilon or velocity); models with a learned variance
(DiT with ``learn_sigma``) return ``2C`` channels and the variance half is ignored, as diffusers'
``DiTPipeline`` does.

Classifier-free guidance: with ``guidance_scale != 1`` and a ``null_cond`` (e.g. the DiT null class
``num_classes``) the model runs once on ``concat(cond, null_cond)`` and
``out = out_uncond + guidance_scale * (out_cond - out_uncond)``.

The loops are ``lax.fori_loop``s, so a sampler can be wrapped in ``jax.jit`` whole (see
``make_sampler``); randomness comes from explicit keys, so teacher and student sampled from the same
``noise`` and ``key`` see identical noise image for image.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fraqat_jax.diffusion.families import apply_model, model_time, sampler_of
from fraqat_jax.diffusion.noise import ddim_timesteps, ddpm_alphas_cumprod, flow_sigmas

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SAMPLERS = ("ddpm", "ddim", "euler")


def _guided(model_fn: ModelFn, guidance_scale: float, null_cond: Any, channels: int, channel_axis: int):
    """Wraps ``model_fn`` so it returns the (guided) first ``channels`` channels."""

    def first_channels(out):
        return jax.lax.slice_in_dim(out, 0, channels, axis=channel_axis)

    if guidance_scale == 1.0 or null_cond is None:
        if guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs a null_cond (the unconditional input)")
        return lambda x, t, cond: first_channels(model_fn(x, t, cond))

    def fn(x, t, cond):
        b = x.shape[0]
        null = jax.tree.map(lambda c, n: jnp.broadcast_to(n, c.shape).astype(c.dtype), cond, null_cond)
        both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
        out = first_channels(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both))
        out_c, out_u = out[:b], out[b:]
        return out_u + guidance_scale * (out_c - out_u)

    return fn


def ddim_sample(
    model_fn: ModelFn,
    noise: jax.Array,
    cond: Any,
    *,
    num_steps: int = 50,
    alphas_cumprod: np.ndarray | None = None,
    eta: float = 0.0,
    key: jax.Array | None = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    clip_sample: float | None = None,
    channel_axis: int = 1,
) -> jax.Array:
    """DDIM (Song et al. 2021) from ``noise`` (the sample at the last timestep) to ``x_0``.

    ``eta = 0`` is deterministic; ``eta > 0`` needs ``key``. The final step goes to
    ``alpha_cumprod = 1`` (diffusers' ``set_alpha_to_one``). ``clip_sample`` clips the predicted
    ``x_0`` to ``[-c, c]`` when given. Returns an array like ``noise``.
    """
    if alphas_cumprod is None:
        alphas_cumprod = ddpm_alphas_cumprod()
    if eta != 0.0 and key is None:
        raise ValueError("ddim_sample with eta > 0 needs a key")
    acp = np.asarray(alphas_cumprod, np.float64)
    ts = ddim_timesteps(num_steps, len(acp))
    a_t = jnp.asarray(acp[ts], jnp.float32)
    a_prev = jnp.asarray(np.concatenate([acp[ts[1:]], [1.0]]), jnp.float32)
    t_in = jnp.asarray(ts, jnp.float32)
    fn = _guided(model_fn, guidance_scale, null_cond, noise.shape[channel_axis], channel_axis)
    b = noise.shape[0]

    def body(i, x):
        eps = fn(x, jnp.full((b,), t_in[i]), cond).astype(jnp.float32)
        at, ap = a_t[i], a_prev[i]
        x0 = (x - jnp.sqrt(1 - at) * eps) / jnp.sqrt(at)
        if clip_sample is not None:
            x0 = jnp.clip(x0, -clip_sample, clip_sample)
            eps = (x - jnp.sqrt(at) * x0) / jnp.sqrt(1 - at)
        sigma = eta * jnp.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        x = jnp.sqrt(ap) * x0 + jnp.sqrt(jnp.maximum(1 - ap - sigma**2, 0.0)) * eps
        if eta != 0.0:
            x = x + sigma * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x

    return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def ddpm_sample(
    model_fn: ModelFn,
    noise: jax.Array,
    cond: Any,
    *,
    key: jax.Array,
    num_steps: int | None = None,
    alphas_cumprod: np.ndarray | None = None,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    clip_sample: float | None = None,
    channel_axis: int = 1,
) -> jax.Array:
    """Ancestral DDPM sampling with the fixed posterior variance ``beta_tilde``.

    With ``num_steps`` below the training length the chain is respaced (Nichol & Dhariwal 2021):
    ``beta_t = 1 - alpha_cumprod[t] / alpha_cumprod[t_prev]`` on the DDIM timesteps. Noise at step
    ``i`` is ``normal(fold_in(key, i))``; none is added at the last step.
    """
    if alphas_cumprod is None:
        alphas_cumprod = ddpm_alphas_cumprod()
    acp = np.asarray(alphas_cumprod, np.float64)
    num_steps = len(acp) if num_steps is None else num_steps
    ts = ddim_timesteps(num_steps, len(acp))
    at_np = acp[ts]
    ap_np = np.concatenate([acp[ts[1:]], [1.0]])
    beta = 1 - at_np / ap_np
    coef_x0 = np.sqrt(ap_np) * beta / (1 - at_np)
    coef_xt = np.sqrt(1 - beta) * (1 - ap_np) / (1 - at_np)
    var = (1 - ap_np) / (1 - at_np) * beta
    consts = [jnp.asarray(c, jnp.float32) for c in (at_np, coef_x0, coef_xt, np.sqrt(var), ts)]
    a_t, c0, ct, std, t_in = consts
    fn = _guided(model_fn, guidance_scale, null_cond, noise.shape[channel_axis], channel_axis)
    b = noise.shape[0]

    def body(i, x):
        eps = fn(x, jnp.full((b,), t_in[i]), cond).astype(jnp.float32)
        x0 = (x - jnp.sqrt(1 - a_t[i]) * eps) / jnp.sqrt(a_t[i])
        if clip_sample is not None:
            x0 = jnp.clip(x0, -clip_sample, clip_sample)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return c0[i] * x0 + ct[i] * x + std[i] * z

    return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def euler_sample(
    model_fn: ModelFn,
    noise: jax.Array,
    cond: Any,
    *,
    num_steps: int = 28,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    null_cond: Any = None,
    channel_axis: int = 1,
) -> jax.Array:
    """Euler integration of a rectified-flow velocity field from ``sigma = 1`` (noise) to 0.

    Convention of SD3 / diffusers: ``x_sigma = (1 - sigma) x_0 + sigma * noise``, the model predicts
    ``v = noise - x_0`` at timestep ``1000 * sigma``, and ``x <- x + (sigma_next - sigma) v``.
    """
    sig = jnp.asarray(flow_sigmas(num_steps, shift), jnp.float32)
    fn = _guided(model_fn, guidance_scale, null_cond, noise.shape[channel_axis], channel_axis)
    b = noise.shape[0]

    def body(i, x):
        v = fn(x, jnp.full((b,), sig[i] * 1000.0), cond).astype(jnp.float32)
        return x + (sig[i + 1] - sig[i]) * v

    return jax.lax.fori_loop(0, num_steps, body, noise.astype(jnp.float32))


def sample(
    kind: str,
    model_fn: ModelFn,
    noise: jax.Array,
    cond: Any,
    *,
    key: jax.Array | None = None,
    **kwargs,
) -> jax.Array:
    """Dispatches to ``ddpm_sample``, ``ddim_sample`` or ``euler_sample`` by name."""
    if kind == "ddim":
        return ddim_sample(model_fn, noise, cond, key=key, **kwargs)
    if kind == "ddpm":
        if key is None:
            raise ValueError("the ddpm sampler needs a key")
        return ddpm_sample(model_fn, noise, cond, key=key, **kwargs)
    if kind == "euler":
        return euler_sample(model_fn, noise, cond, **kwargs)
    raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLERS)}")


def make_noise(seed: int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The fixed starting noise and the key for the sampler's per-step noise, both from ``seed``.

    Sampling teacher and student with the same seed gives them identical noise, image for image.
    """
    k_init, k_steps = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k_init, shape, jnp.float32), k_steps


def make_sampler(kind: str, apply: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], **kwargs):
    """A jitted ``(params, noise, cond, key) -> samples`` for ``apply(params, x, t, cond)``.

    ``params`` is passed as an argument (not closed over) so one compiled sampler serves a teacher
    and a student of the same structure, or a student at several bit-widths.
    """
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLERS)}")

    @jax.jit
    def run(params, noise, cond, key):
        fn = lambda x, t, c: apply(params, x, t, c)  # noqa: E731
        return sample(kind, fn, noise, cond, key=key if kind != "euler" else None, **kwargs)

    return run


def model_sampler(build: Callable[[Any], Any], family, *, num_steps: int, guidance_scale: float = 1.0,
                  shift: float = 1.0, out_shardings=None):
    """Samples a model of ``family`` with its evaluation sampler (``sampler_of``): a jitted
    ``(params, noise, cond, key, null_cond) -> samples [B, C, H, W]``.

    ``build(params)`` returns the model to call (e.g. ``nnx.merge(graphdef, state)``, or a student
    with its bit-width set); ``params`` is an argument, not closed over, so one compilation serves a
    teacher and students of the same structure at any weights and bit-width. ``null_cond`` is the
    unconditional input for classifier-free guidance (used when ``guidance_scale != 1``); ``key``
    drives the sampler's own noise (unused by the deterministic DDIM and Euler samplers). ``shift``:
    the rectified-flow time shift of the Euler sampler's sigmas (SD3: 3.0; ignored by DDIM).
    This is the one way the trainer's sample grids, the evaluator, data-free data and the export's
    calibration sample a model.
    """
    kind = sampler_of(family)

    def run(params, noise, cond, key, null_cond=None):
        model = build(params)
        fn = lambda x, t, c: apply_model(model, family, x, model_time(family, t), c)  # noqa: E731
        kw: dict[str, Any] = {"num_steps": num_steps}
        if guidance_scale != 1.0:
            kw.update(guidance_scale=guidance_scale, null_cond=null_cond)
        if kind == "euler" and shift != 1.0:
            kw["shift"] = shift
        return sample(kind, fn, noise, cond, key=key if kind != "euler" else None, **kw)

    return jax.jit(run, **({} if out_shardings is None else {"out_shardings": out_shardings}))
