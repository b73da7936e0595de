"""Noise schedules and training inputs, with explicit arguments (no config objects).

- DDPM (DiT, PixArt): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` with ``a_t = alphas_cumprod[t]``,
  ``t`` uniform over ``0 .. num_train_timesteps - 1`` (linear betas 1e-4 .. 0.02, as diffusers' DiT).
- Rectified flow (SD3, Sana, Flux): ``x_sigma = (1 - sigma) x_0 + sigma noise`` with a logit-normal
  ``sigma = sigmoid(logit_mean + logit_std * N(0, 1))`` (SD3's training density).

:func:`diffusion_inputs` draws either for a model family and returns the timestep in that family's
convention (``families.model_timestep``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fraqat_jax.diffusion.families import model_timestep, objective_of

__all__ = ["ddim_timesteps", "ddpm_alphas_cumprod", "diffusion_inputs", "flow_dpm_schedule", "flow_sigmas",
           "logit_normal_sigmas", "shift_sigmas"]


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> np.ndarray:
    """Cumulative products of ``1 - beta`` (float64, shape ``(num_train_timesteps,)``).

    ``linear`` and ``scaled_linear`` follow diffusers' ``DDPMScheduler`` (DiT uses linear
    1e-4 .. 0.02 over 1000 steps); ``squaredcos_cap_v2`` is the cosine schedule.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(n, dtype=np.float64)
        betas = np.minimum(1 - f((i + 1) / n) / f(i / n), 0.999)
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; allowed: linear, scaled_linear, squaredcos_cap_v2"
        )
    return np.cumprod(1.0 - betas)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending timesteps, evenly spaced with diffusers' "leading" spacing (int64, ``(num_steps,)``)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps, dtype=np.int64) * ratio)[::-1].copy()


def shift_sigmas(s, shift: float):
    """SD3's time shift of rectified-flow noise levels, ``s -> shift s / (1 + (shift - 1) s)`` (numpy
    or JAX arrays alike)."""
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """Rectified-flow noise levels, descending, then a final 0 (float64, ``(num_steps + 1,)``).

    The same as diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (static shift), so
    samples match an SD3 pipeline: ``num_steps`` points evenly spaced from 1 to the scheduler's
    smallest training sigma, then SD3's time shift ``s -> shift * s / (1 + (shift - 1) * s)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = np.linspace(1.0, shift_sigmas(1.0 / num_train_timesteps, shift), num_steps, dtype=np.float64)
    return np.concatenate([shift_sigmas(s, shift), [0.0]])


def flow_dpm_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """The steps of flow DPM-Solver++ (2M), as diffusers' ``DPMSolverMultistepScheduler`` with
    ``use_flow_sigmas``, ``flow_shift=shift``, ``solver_order=2``, ``final_sigmas_type="zero"``.

    Sigmas: ``num_steps`` points of ``1 - linspace(1, 1/N, num_steps + 1)`` from the top, shifted
    ``s -> shift s / (1 + (shift - 1) s)``, then 0; timesteps ``floor(N sigma)`` (``N`` =
    ``num_train_timesteps``). With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``,
    ``h_i = lambda_{i+1} - lambda_i`` and data predictions ``x0_i``, step ``i`` is
    ``x_{i+1} = c_x[i] x_i + c_0[i] x0_i + c_1[i] x0_{i-1}``: first order
    (``c_x = sigma_{i+1} / sigma_i``, ``c_0 = alpha_{i+1} (1 - exp(-h_i))``, ``c_1 = 0``) on the first
    and last step, second-order midpoint (``D1 = (x0_i - x0_{i-1}) / r``, ``r = h_{i-1} / h_i``) in
    between. Returns float64 arrays ``sigmas (num_steps + 1,)``, ``timesteps``, ``c_x``, ``c_0``,
    ``c_1`` (``(num_steps,)`` each); ``sigmas`` are rounded to float32 as diffusers stores them.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    n = num_train_timesteps
    raw = 1.0 - np.linspace(1.0, 1.0 / n, num_steps + 1)
    top = np.flip(shift_sigmas(raw, shift))[:-1].copy()
    timesteps = (top * n).astype(np.int64).astype(np.float64)
    sig = np.concatenate([top, [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1.0 - sig
    # exp(-h_i) = (sigma_{i+1} / alpha_{i+1}) / (sigma_i / alpha_i): 0 on the step to sigma = 0
    decay = (sig[1:] * alpha[:-1]) / (alpha[1:] * sig[:-1])
    c_x = sig[1:] / sig[:-1]
    c_0 = alpha[1:] * (1.0 - decay)
    c_1 = np.zeros(num_steps)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    for i in range(1, num_steps - 1):
        r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
        c_0[i] = alpha[i + 1] * (1.0 - decay[i]) * (1.0 + 0.5 / r)
        c_1[i] = -alpha[i + 1] * (1.0 - decay[i]) * 0.5 / r
    return {"sigmas": sig, "timesteps": timesteps, "c_x": c_x, "c_0": c_0, "c_1": c_1}


def logit_normal_sigmas(key, n: int, logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """``n`` noise levels ``sigmoid(logit_mean + logit_std * N(0, 1))``, float32 ``(n,)`` in (0, 1)."""
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,), jnp.float32))


def diffusion_inputs(family, key, latents, *, num_train_timesteps: int = 1000, logit_mean: float = 0.0,
                     logit_std: float = 1.0):
    """Noisy inputs and model timesteps for clean ``latents`` [B, C, H, W] of ``family``.

    Returns ``(x_t, t)``: ``x_t`` float32 like ``latents``; ``t`` float32 ``(B,)`` in the family's
    timestep convention (DDPM step index, ``1000 * sigma``, or ``sigma`` for Flux). The time draw uses
    the first half of ``split(key)``, the noise the second.
    """
    k_t, k_noise = jax.random.split(key)
    b = latents.shape[0]
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    x0 = latents.astype(jnp.float32)
    bshape = (b,) + (1,) * (latents.ndim - 1)
    if objective_of(family) == "ddpm":
        acp = jnp.asarray(ddpm_alphas_cumprod(num_train_timesteps), jnp.float32)
        t = jax.random.randint(k_t, (b,), 0, num_train_timesteps)
        a = acp[t].reshape(bshape)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise, t.astype(jnp.float32)
    sigma = logit_normal_sigmas(k_t, b, logit_mean, logit_std)
    s = sigma.reshape(bshape)
    return (1.0 - s) * x0 + s * noise, model_timestep(family, sigma=sigma)
