"""Pretrains the built-in teachers: class-conditional DiTs on the shipped 8x8 digits.

``python -m fraqat_jax.pretrain [--size s|m] [--steps N] [--out DIR]`` trains
``DiTTransformer2DModel`` (``--size s``: :data:`TEACHER_CONFIG`, about 0.4 M parameters, the
``builtin`` teacher; ``--size m``: :data:`TEACHER_CONFIG_M`, about 3.9 M parameters, the
``builtin:m`` teacher, shipped) with the DiT recipe in pixel space: DDPM linear
betas over 1000 steps, epsilon-prediction MSE, 10% label dropout to the null class (for
classifier-free guidance), AdamW, EMA of the weights (the EMA is what is saved). Writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` to ``fraqat_jax/assets/digits_dit``
(``--size m``: ``digits_dit_m``) or ``--out``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fraqat_jax.data import digits
from fraqat_jax.diffusion import ddpm_alphas_cumprod
from fraqat_jax.models import DiTTransformer2DModel

TEACHER_CONFIG = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_embeds_ada_norm": 10,
}
# About 10x the parameters of the small one (width 192, 5 blocks): 3.85 M float32 = 15.4 MB, under the
# 20 MB we ship in the wheel.
TEACHER_CONFIG_M = {**TEACHER_CONFIG, "num_layers": 5, "num_attention_heads": 6, "attention_head_dim": 32}
SIZES = {"s": (TEACHER_CONFIG, "builtin", 6000, 1e-3), "m": (TEACHER_CONFIG_M, "builtin:m", 4000, 5e-4)}


def pretrain(steps: int = 6000, *, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
             ema_decay: float = 0.999, log_every: int = 500, config=None):
    """Trains the teacher (``config``, default :data:`TEACHER_CONFIG`) and returns it (EMA weights)."""
    config = TEACHER_CONFIG if config is None else config
    model = DiTTransformer2DModel(config, rngs=nnx.Rngs(seed))
    graph, params = nnx.split(model, nnx.Param)[:2]
    rest = nnx.split(model, nnx.Param, ...)[2]
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    source = digits(seed=seed)
    acp = jnp.asarray(ddpm_alphas_cumprod(1000), jnp.float32)
    num_classes = config["num_embeds_ada_norm"]
    warmup = min(200, steps - 1)  # short smoke runs still need a decay phase
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)

    @jax.jit
    def step(params, opt, ema, batch, key):
        k_t, k_n, k_drop = jax.random.split(key, 3)
        x0, y = batch["latents"], batch["class_labels"]
        t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(k_n, x0.shape)
        a = acp[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        y = jnp.where(jax.random.uniform(k_drop, y.shape) < 0.1, num_classes, y)

        def loss_fn(p):
            out = nnx.merge(graph, p, rest)(hidden_states=x_t, timestep=t.astype(jnp.float32), class_labels=y)
            return jnp.mean(jnp.square(out - noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return params, opt, ema, loss

    key = jax.random.key(seed)
    t0, losses = time.perf_counter(), []
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in source.batch(i, batch_size).items()}
        params, opt, ema, loss = step(params, opt, ema, batch, jax.random.fold_in(key, i))
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            print(f"pretrain step {i + 1}/{steps}  loss {float(np.mean(jax.device_get(losses[-log_every:]))):.4f}  "
                  f"{(i + 1) / (time.perf_counter() - t0):.1f} it/s", flush=True)
    return nnx.merge(graph, ema, rest)

