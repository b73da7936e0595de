"""Samplers against diffusers' schedulers stepping the same toy model (float64 numpy reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fraqat_jax.diffusion import samplers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def toy_jax(x, t, c):
    """A smooth nonlinear 'model' with 2C output channels (learned-sigma layout)."""
    eps = jnp.tanh(0.5 * x + 0.001 * t[:, None, None, None] + 0.1 * c[:, None, None, None])
    return jnp.concatenate([eps, 100.0 + x], axis=1)  # the variance half must be ignored


def toy_np(x, t, c):
    return np.tanh(0.5 * x + 0.001 * t + 0.1 * c[:, None, None, None])


@pytest.fixture
def start():
    noise, key = samplers.make_noise(0, (3, 2, 4, 4))
    return noise, key, jnp.array([0.0, 1.0, 2.0])


def test_ddim_matches_diffusers(start):
    noise, _, c = start
    out = jax.jit(lambda n: samplers.ddim_sample(toy_jax, n, c, num_steps=10))(noise)
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    x = torch.tensor(np.asarray(noise), dtype=torch.float64)
    for t in sched.timesteps:
        eps = torch.tensor(toy_np(x.numpy(), float(t), np.asarray(c)))
        x = sched.step(eps, t, x).prev_sample
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=2e-4, atol=2e-4)


def test_ddpm_matches_diffusers_with_same_noise(start, monkeypatch):
    noise, key, c = start
    steps = 8
    out = samplers.ddpm_sample(toy_jax, noise, c, key=key, num_steps=steps, clip_sample=1.0)
    # diffusers draws its own noise; hand it the sampler's per-step draws instead
    draws = iter(
        np.asarray(jax.random.normal(jax.random.fold_in(key, i), noise.shape)) for i in range(steps)
    )
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: torch.tensor(next(draws), dtype=torch.float64))
    sched = diffusers.DDPMScheduler(clip_sample=True, clip_sample_range=1.0)
    sched.set_timesteps(steps)
    x = torch.tensor(np.asarray(noise), dtype=torch.float64)
    for t in sched.timesteps:
        eps = torch.tensor(toy_np(x.numpy(), float(t), np.asarray(c)))
        x = sched.step(eps, t, x).prev_sample
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match(start, shift):
    noise, _, c = start
    out = samplers.euler_sample(toy_jax, noise, c, num_steps=6, shift=shift)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(6)
    x = torch.tensor(np.asarray(noise), dtype=torch.float64)
    for t in sched.timesteps:
        v = torch.tensor(toy_np(x.numpy(), float(t), np.asarray(c)))
        x = sched.step(v, t, x).prev_sample
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=2e-4, atol=2e-4)


def test_classifier_free_guidance_combines_cond_and_null(start):
    noise, _, c = start
    s = 4.0
    got = samplers.ddim_sample(toy_jax, noise, c, num_steps=3, guidance_scale=s, null_cond=jnp.array(7.0))
    # reference: guidance written out by hand around the unguided sampler's model
    guided = lambda x, t, cc: jnp.concatenate(  # noqa: E731
        [
            toy_jax(x, t, jnp.full_like(cc, 7.0))[:, :2]
            + s * (toy_jax(x, t, cc)[:, :2] - toy_jax(x, t, jnp.full_like(cc, 7.0))[:, :2]),
            x,
        ],
        axis=1,
    )
    want = samplers.ddim_sample(guided, noise, c, num_steps=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = samplers.ddim_sample(toy_jax, noise, c, num_steps=3)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-2


def test_fixed_seed_gives_identical_noise_and_samples():
    a, ka = samplers.make_noise(5, (2, 1, 8, 8))
    b, kb = samplers.make_noise(5, (2, 1, 8, 8))
    d, _ = samplers.make_noise(6, (2, 1, 8, 8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(d))
    run = samplers.make_sampler("ddpm", lambda p, x, t, c: p * toy_jax(x, t, c), num_steps=4)
    c = jnp.zeros((2,))
    np.testing.assert_array_equal(np.asarray(run(1.0, a, c, ka)), np.asarray(run(1.0, b, c, kb)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.make_sampler("heun", lambda p, x, t, c: x)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.ddim_timesteps(0)
    with pytest.raises(ValueError, match="null_cond"):
        samplers.ddim_sample(toy_jax, jnp.zeros((1, 2, 2, 2)), jnp.zeros((1,)), num_steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        samplers.ddpm_alphas_cumprod(beta_schedule="quadratic")


# Sana's scheduler/scheduler_config.json (Efficient-Large-Model/Sana_*_diffusers), the keys that matter
SANA_SCHEDULER = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                      final_sigmas_type="zero", prediction_type="flow_prediction", use_flow_sigmas=True,
                      flow_shift=3.0, timestep_spacing="linspace", num_train_timesteps=1000)


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (20, 3.0), (1, 3.0), (4, 1.0)])
def test_flow_dpm_matches_diffusers_step_by_step(start, steps, shift):
    """Our flow DPM-Solver++ and diffusers' DPMSolverMultistepScheduler fed the same model outputs:
    same timesteps, the same sample after every step within 1e-5."""
    noise, _, c = start
    seen = []  # (x, t, v) of every model call, in order

    def model(x, t, cond):
        out = toy_jax(x, t, cond)[:, :2]
        seen.append((np.asarray(x), np.asarray(t), np.asarray(out)))
        return out

    with jax.disable_jit():  # the loop runs in Python, so each step's input is seen
        out = samplers.flow_dpm_sample(model, noise, c, num_steps=steps, shift=shift)
    sched = diffusers.DPMSolverMultistepScheduler(**{**SANA_SCHEDULER, "flow_shift": shift})
    sched.set_timesteps(steps)
    assert len(seen) == steps == len(sched.timesteps)
    x = torch.tensor(np.asarray(noise))
    for i, t in enumerate(sched.timesteps):
        x_ours, t_ours, v = seen[i]
        np.testing.assert_allclose(x_ours, x.numpy(), rtol=0, atol=1e-5, err_msg=f"step {i}")
        np.testing.assert_array_equal(t_ours, np.full(3, float(t)))  # the pipeline's integer timestep
        x = sched.step(torch.tensor(v), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=0, atol=1e-5)
    jitted = jax.jit(lambda n: samplers.flow_dpm_sample(toy_jax, n, c, num_steps=steps, shift=shift))(noise)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out), rtol=0, atol=1e-5)


def test_sana_samples_with_flow_dpm_and_guidance(start):
    """Sana's family sampler is flow DPM-Solver++; guidance combines cond and null before the update."""
    from fraqat_jax.diffusion.families import sampler_of

    assert sampler_of("sana") == "flow_dpm" and sampler_of("sd3") == "euler"
    noise, _, c = start
    s = 4.5
    got = samplers.sample("flow_dpm", toy_jax, noise, c, num_steps=3, guidance_scale=s, null_cond=jnp.array(7.0))

    def guided(x, t, cond):
        u = toy_jax(x, t, jnp.full_like(cond, 7.0))[:, :2]
        return u + s * (toy_jax(x, t, cond)[:, :2] - u)

    want = samplers.flow_dpm_sample(guided, noise, c, num_steps=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
