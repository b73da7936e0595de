"""The jitted distillation step: bits follow the schedule inside jit (one compilation), the loss
is the MSE between student and teacher outputs on the family's noisy inputs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fraqat_jax import nn as fq_nn
from fraqat_jax.train import load_config
from fraqat_jax.train.step import make_schedule
from fraqat_jax.train.models import load_teacher, make_student
from fraqat_jax.family import families
from fraqat_jax.train.step import make_lr_schedule, make_optimizer, make_train_step



def _setup(base, **over):
    cfg = load_config(base={**base, **over})
    teacher = load_teacher(cfg)
    student = make_student(teacher, cfg)
    tg, ts = nnx.split(teacher)
    sg, params, rest = nnx.split(student, nnx.Param, ...)
    params, rest, ts = nnx.to_pure_dict(params), nnx.to_pure_dict(rest), nnx.to_pure_dict(ts)
    tx = make_optimizer(cfg)
    sched = make_schedule(cfg)
    step_fn = make_train_step(cfg, schedule=sched, teacher_graph=tg, student_graph=sg, family="dit", tx=tx,
                              lr_schedule=make_lr_schedule(cfg), donate=False)
    state = {"params": params, "opt_state": tx.init(params), "ema": None, "step": jnp.zeros((), jnp.int32)}
    return cfg, sched, step_fn, state, ts, rest, (tg, sg)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"latents": jnp.asarray(rng.uniform(-1, 1, (n, 1, 8, 8)), jnp.float32),
            "class_labels": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def test_bits_follow_schedule_with_one_compilation(base):
    cfg, sched, step_fn, state, ts, rest, _ = _setup(base, steps=25)
    seen = []
    for _ in range(25):
        state, m = step_fn(state, ts, rest, _batch())
        seen.append(float(m["bits"]))
        assert np.isfinite(float(m["loss"]))
    # 25 steps of fraqat visit 8, 7, 6, 5.5, 5, 4.75, 4.75, 4.5, 4.5, 4.25, 4.25, 4, ...
    expected = [8, 7, 6, 5.5, 5, 4.75, 4.75, 4.5, 4.5, 4.25, 4.25] + [4] * 14
    np.testing.assert_array_equal(seen, expected)
    assert step_fn._cache_size() == 1
    assert int(state["step"]) == 25


def test_loss_is_mse_to_teacher_on_ddpm_inputs(base):
    cfg, sched, step_fn, state, ts, rest, (tg, sg) = _setup(base, steps=25)
    batch = _batch(seed=1)
    state = {**state, "step": jnp.asarray(3, jnp.int32)}  # bits 5.5
    _, m = step_fn(state, ts, rest, batch)
    # Independent recomputation: the DDPM forward process with numpy and concrete bits.
    key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    k_t, k_noise = jax.random.split(key)
    t = np.asarray(jax.random.randint(k_t, (16,), 0, 1000))
    noise = np.asarray(jax.random.normal(k_noise, (16, 1, 8, 8)))
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)).astype(np.float32)
    x0 = np.asarray(batch["latents"])
    a = acp[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(np.float32(1) - a) * noise

    @jax.jit
    def outputs(ts, params, x_t, t, labels):
        teacher = nnx.merge(tg, ts)
        student = nnx.merge(sg, params, rest)
        fq_nn.set_bits(student, 5.5)
        kw = dict(hidden_states=x_t, timestep=t, class_labels=labels)
        return teacher(**kw), student(**kw)

    out_t, out_s = map(np.asarray, outputs(ts, state["params"], jnp.asarray(x_t), jnp.asarray(t, jnp.float32),
                                           batch["class_labels"]))
    assert out_t.shape == (16, 2, 8, 8)  # epsilon and variance channels both distilled
    np.testing.assert_allclose(float(m["bits"]), 5.5)
    np.testing.assert_allclose(float(m["loss"]), np.mean((out_s - out_t) ** 2), rtol=1e-4)
    assert float(m["loss"]) > 0


def test_training_reduces_loss_and_teacher_gets_no_update(base):
    cfg, sched, step_fn, state, ts, rest, _ = _setup(base, steps=25, schedule="constant", lr=3e-3)
    ts_before = jax.tree.map(np.asarray, ts)
    losses = []
    for i in range(25):
        state, m = step_fn(state, ts, rest, _batch(seed=i % 4))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    jax.tree.map(np.testing.assert_array_equal, ts_before, jax.tree.map(np.asarray, ts))


def test_grad_accumulation_matches_full_batch(base):
    _, _, full, state, ts, rest, _ = _setup(base, steps=25)
    _, _, accum, _, _, _, _ = _setup(base, steps=25, grad_accum=4)
    b = _batch(seed=3)
    s1, m1 = full(state, ts, rest, b)
    s2, m2 = accum(state, ts, rest, b)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-6), s1["params"], s2["params"])


def test_rectified_flow_inputs_match_formula():
    cfg = load_config(base={"logit_mean": 0.5, "logit_std": 0.8})
    key = jax.random.key(7)
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4, 4, 4)), jnp.float32)
    x_t, t, _ = families()["sd3"].training_inputs(key, {"latents": x0}, cfg)
    k_t, k_noise = jax.random.split(key)
    sigma = 1 / (1 + np.exp(-(0.5 + 0.8 * np.asarray(jax.random.normal(k_t, (6,))))))
    noise = np.asarray(jax.random.normal(k_noise, x0.shape))
    s = sigma[:, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), (1 - s) * np.asarray(x0) + s * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t), 1000 * sigma, rtol=1e-5)
    _, t_flux, _ = families()["flux"].training_inputs(key, {"latents": x0}, cfg)
    np.testing.assert_allclose(np.asarray(t_flux), sigma, rtol=1e-5)


def test_lr_schedules():
    cfg = load_config(base={"steps": 100, "lr": 1e-3, "warmup_steps": 10, "end_lr_fraction": 0.1})
    lr = make_lr_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    # cosine from step 10 to 100 down to 1e-4
    np.testing.assert_allclose(float(lr(55)), 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
    const = make_lr_schedule(load_config(base={"steps": 100, "lr": 1e-3, "warmup_steps": 10, "lr_schedule": "constant"}))
    np.testing.assert_allclose([float(const(s)) for s in (5, 10, 99)], [5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_lr_restart_follows_the_bit_stages():
    """``lr_schedule=restart``: warmup, then one cosine per stage of the bit schedule, each from the
    peak down to lr * end_lr_fraction at the stage's end (numpy formula of optax's cosine)."""
    cfg = load_config(base={"steps": 50, "lr": 1e-3, "warmup_steps": 2, "end_lr_fraction": 0.1,
                            "schedule": "simple", "lr_schedule": "restart"})
    lr = make_lr_schedule(cfg)
    stages = make_schedule(cfg).stages  # simple: 16, 8, 4 bits for 10, 12, 28 steps
    assert [n for _, n in stages] == [10, 12, 28]

    def cosine(i, n):
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * min(i, n) / n))

    want = [0.0, 5e-4] + [cosine(i - 2, 8) for i in range(2, 10)]
    want += [cosine(i, 12) for i in range(12)] + [cosine(i, 28) for i in range(28)]
    np.testing.assert_allclose([float(lr(i)) for i in range(50)], want, rtol=1e-5, atol=1e-9)
    # vanilla QAT has one stage: restart is the cosine schedule
    flat = {"steps": 50, "lr": 1e-3, "warmup_steps": 2, "schedule": "constant"}
    a = make_lr_schedule(load_config(base={**flat, "lr_schedule": "restart"}))
    b = make_lr_schedule(load_config(base=flat))
    np.testing.assert_array_equal([float(a(i)) for i in range(50)], [float(b(i)) for i in range(50)])


def test_seed_is_an_argument_not_a_constant(base):
    """Runs that differ only in seed share one program (compare's paired seeds compile once) and
    still draw different noise."""
    _, _, step_a, state, ts, rest, _ = _setup(base, steps=4, seed=1)
    _, _, step_b, _, _, _, _ = _setup(base, steps=4, seed=2)
    args = (state, ts, rest, _batch())
    assert step_a.lower(*args).as_text() == step_b.lower(*args).as_text()
    loss_a = float(step_a(*args)[1]["loss"])
    assert loss_a != float(step_b(*args)[1]["loss"])
    assert loss_a == float(step_a.lower(*args).compile()(*args)[1]["loss"])


def test_any_int_seed_gives_the_key_it_always_gave(base):
    """The key passed into the step is ``key(seed)``'s data, for negative and 64-bit seeds too."""
    for seed in (-3, 2**40 + 5):
        cfg, _, step, state, ts, rest, _ = _setup(base, steps=4, seed=seed)
        want = jax.random.key_data(jax.random.key(seed))
        np.testing.assert_array_equal(jax.random.key_data(jax.random.wrap_key_data(step.seed)), want)
        assert np.isfinite(float(step(state, ts, rest, _batch())[1]["loss"]))
