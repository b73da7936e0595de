"""Attention implementations (fraqat_jax.models.attention): ``auto``/``flash`` compute what ``xla``
computes on the CPU, and the Pallas TPU flash kernel compiles ahead of time for a TPU topology
(libtpu's AOT compiler, no TPU needed) inside a sharded, scanned model without the score matrix."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fraqat_jax.models.attention import dot_product_attention


def _qkv(seed, b=2, t=5, s=7, h=3, d=8):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32))


def _numpy_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v per head, masked keys at -inf (numpy reference)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("implementation", ["xla", "auto", "flash"])
def test_every_implementation_is_softmax_attention_on_cpu(implementation):
    q, k, v = _qkv(0)
    key_mask = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0]], bool)[:, None, None, :]  # caption padding
    causal = np.tril(np.ones((5, 7), bool))[None, None]  # a mask the TPU kernel does not take
    for mask in (None, key_mask, causal):
        out = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, implementation))(q, k, v, mask)
        np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


_TPU_SCRIPT = textwrap.dedent(r"""
    import json, os
    os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                      ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.experimental.topologies import get_topology_desc
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fraqat_jax.models import PixArtTransformer2DModel
    from fraqat_jax.models.attention import dot_product_attention

    devices = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False)).devices
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
    out = {}

    def compile_attention(implementation, tokens, masked):
        spec = NamedSharding(mesh, P("data", None, "tensor", None))
        qkv = jax.ShapeDtypeStruct((4, tokens, 4, 64), jnp.bfloat16, sharding=spec)
        mask = jax.ShapeDtypeStruct((4, 1, 1, tokens), jnp.bool_, sharding=NamedSharding(mesh, P("data")))

        def loss(q, k, v, m):
            o = dot_product_attention(q, k, v, m if masked else None, implementation)
            return jnp.sum(jnp.square(o.astype(jnp.float32)))

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, mask).compile()
        text = compiled.as_text()
        scores = f"{tokens},{tokens}]"  # an array holding a [tokens, tokens] score matrix
        return (text.count("tpu_custom_call"), text.replace(" ", "").count(scores),
                compiled.memory_analysis().temp_size_in_bytes)

    for name, args in {"flash": ("flash", 4096, False), "flash_masked": ("auto", 200, True),
                       "xla": ("xla", 4096, False)}.items():
        out[name] = compile_attention(*args)

    # a tiny PixArt (caption mask, two scanned blocks), forward and backward, batch over "data"
    config = dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=2,
                  cross_attention_dim=128, caption_channels=16, sample_size=16, patch_size=2,
                  use_additional_conditions=False)
    model = nnx.eval_shape(lambda: PixArtTransformer2DModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                            remat=True, scan_layers=True, attention="auto"))
    graphdef, state = nnx.split(model)
    batch = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((4, 4, 16, 16), jnp.float32, sharding=batch)
    captions = jax.ShapeDtypeStruct((4, 12, 16), jnp.float32, sharding=batch)
    t = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=batch)
    mask = jax.ShapeDtypeStruct((4, 12), jnp.int32, sharding=batch)

    def model_loss(s, x, c, t, m):
        y = nnx.merge(graphdef, s)(x, c, t, encoder_attention_mask=m)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), state)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(model_loss)).lower(state, x, captions, t, mask).compile()
    out["pixart"] = compiled.as_text().count("tpu_custom_call")
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_tpu_flash_kernel_compiles_ahead_of_time_without_the_score_matrix():
    pytest.importorskip("libtpu", reason="the TPU AOT compiler ships in libtpu (pip install 'fraqat_jax[tpu]')")
    # libtpu reads its environment when it starts, so the compilation runs in a fresh process.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _TPU_SCRIPT], capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    kernels, score_arrays, flash_temp = result["flash"]
    assert kernels >= 3 and score_arrays == 0  # Mosaic kernels (forward, dK/dV, dQ) hold score tiles only
    assert result["flash_masked"][0] >= 3  # caption mask and 200 tokens (padded to 256) as segment ids
    xla_kernels, xla_score_arrays, xla_temp = result["xla"]
    assert xla_kernels == 0 and xla_score_arrays > 0
    # per chip 2 examples x 2 heads x 4096^2 float32 scores are 256 MiB for XLA alone
    assert flash_temp < xla_temp / 4, (flash_temp, xla_temp)
    assert result["pixart"] >= 6  # self- and cross-attention kernels inside the scanned blocks
