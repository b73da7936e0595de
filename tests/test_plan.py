"""``python -m fraqat_jax.plan`` and the analytic FLOP count.

TPU-topology tests compile the built-in digits DiT's train step ahead of time with libtpu in a
subprocess (libtpu's environment must be set before JAX starts); they skip only where libtpu
cannot be imported. The FLOP count is checked against a count by hand of the DiT's matmuls.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from fraqat_jax import plan
from fraqat_jax.plan import flops
from fraqat_jax.plan import topology as plan_topology

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'fraqat_jax[tpu]')")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"topology", "chips", "hbm_bytes_per_chip", "batch_size", "mesh", "tokens_per_example", "params", "per_chip",
        "fits", "flops_per_step", "estimated_step_seconds", "compile_seconds"}
GiB = 2**30
# A one-block DiT-XL/2 layout at toy width on 8x8 latents: the cheapest compile of a real step.
TINY = ["--set", "teacher=preset:DiT-XL/2-256", "--set",
        ('teacher_config={"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8, '
        '"num_embeds_ada_norm": 10}')]


def _plan_subprocess(tmp_path, *args):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "fraqat_jax.plan", *args, "--json", str(out)], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


# ----------------------------------------------------------------------------- TPU topologies


@needs_libtpu
@pytest.mark.slow
def test_tiny_preset_fits_a_v5e_2x2(tmp_path):
    proc, r = _plan_subprocess(tmp_path, "--topology", "v5e:2x2", "--batch-size", "64", "--mesh", "fsdp=-1",
                               "--mfu", "0.5", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert KEYS <= set(r)
    assert r["topology"] == "v5e:2x2" and r["chips"] == 4 and r["hbm_bytes_per_chip"] == 16 * GiB
    assert r["batch_size"] == 64 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["fits"] is True and r["device_kind"].startswith("TPU v5")
    assert set(r["per_chip"]) >= {"argument", "output", "alias", "temp", "code"}
    assert all(isinstance(r["per_chip"][k], int) and r["per_chip"][k] >= 0 for k in r["per_chip"])
    assert 0 < r["per_chip"]["argument"] < GiB
    assert r["tokens_per_example"] == 16  # 8x8 latents, patch 2, no text
    assert r["params"]["teacher"] == r["params"]["student"] > 0
    # The step time is the analytic FLOPs at half of 4 chips' 197 TFLOP/s.
    assert r["estimated_step_seconds"] == pytest.approx(r["flops_per_step"] / (4 * 197e12 * 0.5))
    assert "per chip: temp" in proc.stdout


@needs_libtpu
@pytest.mark.slow
def test_batch_that_cannot_fit_exits_1_and_says_by_how_much(tmp_path):
    proc, r = _plan_subprocess(tmp_path, "--topology", "v5e:2x2", "--batch-size", str(2**22), *TINY)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert r["fits"] is False and r["batch_size"] == 2**22
    assert "RESOURCE_EXHAUSTED" in r["oom"] and "GiB over" in r["oom"]
    assert r["exceeded_by_bytes"] > 0 and r["required_bytes_per_chip"] > 15 * GiB
    assert "does not fit" in proc.stderr


# ----------------------------------------------------------------------------- local and bad input


def _local_plan(tmp_path, capsys, *argv) -> dict:
    """The JSON report of ``plan --topology local ARGV``, which must exit 0."""
    out = tmp_path / "local.json"
    rc = plan.main(["--topology", "local", *argv, "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    return r


@pytest.mark.slow
def test_local_runs_steps_and_reports_time_and_memory(tmp_path, capsys):
    r = _local_plan(tmp_path, capsys, "--batch-size", "8", "--set", "remat=true", "--run", "2", *TINY)
    assert r["topology"] == "local" and r["chips"] == len(jax.devices())
    assert r["fits"] is True and r["measured_step_seconds"] > 0 and r["peak_bytes"] > 0
    assert r["per_chip"]["argument"] > 0 and r["run_steps"] == 2 and r["remat"] is True


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5e:3x3"], "known topologies: v4:2x2x1"),
    (["--topology", "v7:2x2"], "v5e:2x2"),
    (["--topology", "local", "--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--topology", "local", "--mesh", "data=3,fsdp=5"], "--mesh"),
    (["--topology", "local", "--set", "resolution=abc"], "resolution='abc'"),
    (["--topology", "local", "--mfu", "1.5"], "--mfu 1.5"),
    (["--topology", "v5e:2x2", "--run", "3"], "--run 3 needs --topology local"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert plan.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_missing_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu now raises ImportError
    assert plan.main(["--topology", "v5p:2x2x1"]) == 2
    assert "pip install 'fraqat_jax[tpu]'" in capsys.readouterr().err


def test_topology_names():
    t = plan_topology.parse_topology("v5p:2x2x1")
    assert (t.generation, t.dims, t.chips) == ("v5p", (2, 2, 1), 4)
    assert plan_topology.parse_topology("v6e:2x4").chips == 8 and plan_topology.parse_topology("v5e:4x4").chips == 16
    assert plan.GENERATIONS["v5e"].hbm_bytes == 16 * GiB and plan.GENERATIONS["v6e"].peak_bf16_flops == 918e12


def test_input_shapes_follow_the_vae_factor_and_pipeline_text_lengths():
    from fraqat_jax import models

    sd3 = plan_topology.input_spec("sd3", models.PRESETS["SD3.5-Medium"][1], latent_size=512 // 8)
    assert sd3 == {"latents": ((16, 64, 64), "float32"), "encoder_hidden_states": ((333, 4096), "float32"),
                   "pooled_projections": ((2048,), "float32")}
    assert plan_topology.tokens_of("sd3", models.PRESETS["SD3.5-Medium"][1], sd3) == (1024, 333)
    sana = plan_topology.input_spec("sana", models.PRESETS["Sana-600M"][1], latent_size=512 // 32)
    assert sana["latents"][0] == (32, 16, 16) and sana["encoder_hidden_states"][0] == (300, 2304)
    flux = plan_topology.input_spec("flux", models.PRESETS["FLUX.1-schnell"][1], latent_size=64)
    assert flux["latents"][0] == (16, 64, 64) and flux["encoder_hidden_states"][0] == (256, 4096)
    assert plan_topology.input_spec("flux", models.PRESETS["FLUX.1-dev"][1], latent_size=64)["encoder_hidden_states"][0][0] == 512
    assert plan_topology.tokens_of("flux", models.PRESETS["FLUX.1-schnell"][1], flux) == (1024, 256)
    assert plan_topology.input_spec("pixart", models.PRESETS["PixArt-Sigma-XL-2-512"][1], latent_size=64)[
        "encoder_hidden_states"][0] == (300, 4096)


def test_oom_messages_parse():
    need, have = plan_topology.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                "temporaries (56.00G) exceeds available HBM (15.75G).")
    assert (need, have) == (56 * GiB, int(15.75 * GiB))
    assert plan_topology.parse_oom("Used 20.5G of 15.5G hbm. Exceeded hbm capacity by 5G.") == (int(20.5 * GiB), int(15.5 * GiB))
    assert plan_topology.parse_oom("something else") == (None, None)


# ----------------------------------------------------------------------------- FLOPs


def test_loop_bodies_count_times_their_trip_count():
    """cost_analysis counts a scan body once; the jaxpr count multiplies it by the length."""
    def f(x, ws):
        y, _ = jax.lax.scan(jax.checkpoint(lambda c, w: (jnp.tanh(c @ w), None)), x, ws)
        return y

    x, ws = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((5, 8, 16 // 2), jnp.float32)
    assert flops.count_flops(f, x, ws) == 5 * 2 * 4 * 8 * 8
    xla = jax.jit(f).lower(x, ws).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 5 * 2 * 4 * 8 * 8  # why the planner does not use it


def _dit_forward_by_hand(c, batch: int) -> int:
    """Matmul FLOPs of diffusers' DiT forward, written out from the architecture."""
    d, p, s = c["num_attention_heads"] * c["attention_head_dim"], c["patch_size"], c["sample_size"]
    n = (s // p) ** 2
    timestep_embedder = 2 * 256 * d + 2 * d * d  # sinusoid(256) -> d -> d, per example
    patch_embed = 2 * n * (p * p * c["in_channels"]) * d
    block = (timestep_embedder + 2 * d * 6 * d  # each block's own adaLN-Zero embedder and modulation
             + 4 * 2 * n * d * d  # q, k, v, out
             + 2 * 2 * n * n * d  # scores and weighted values over all heads
             + 2 * 2 * n * d * 4 * d)  # feed-forward d -> 4d -> d
    final = timestep_embedder + 2 * d * 2 * d + 2 * n * d * p * p * c["out_channels"]  # block 0's embedder again
    return batch * (patch_embed + c["num_layers"] * block + final)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dit_forward_flops_match_a_hand_count(scan_layers):
    from fraqat_jax.models import DiTTransformer2DModel

    c = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 3,
         "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10}
    kw = {"scan_layers": True} if scan_layers else {}
    model = nnx.eval_shape(lambda: DiTTransformer2DModel(c, rngs=nnx.Rngs(0), **kw))
    graph, state = nnx.split(model)
    b = 3
    args = (jax.ShapeDtypeStruct((b, 4, 8, 8), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32))
    got = flops.count_flops(lambda st, x, t, y: nnx.merge(graph, st)(x, t, y), state, *args)
    assert got == _dit_forward_by_hand(c, b)
    assert flops.distillation_step_flops(got, got) == 4 * got


# ----------------------------------------------------------------------------- the text family (Gemma-2)

# configs/gemma2_2b.py with a two-layer Gemma-2 at toy width (head_dim 128: the splash kernel's lane
# width, so its tiles hold no padding) and 128-token windows.
TINY_GEMMA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 128, "query_pre_attn_scalar": 128, "vocab_size": 256,
              "sliding_window": 64, "max_position_embeddings": 256}
TINY_TEXT = ["--config", os.path.join(REPO, "configs", "gemma2_2b.py"), "--set", "seq_len=128",
             "--set", "teacher_config=" + json.dumps(TINY_GEMMA)]


def _decoder_forward_by_hand(c, batch: int, seq: int) -> int:
    """Matmul FLOPs of a Gemma-2 forward, written out from the architecture: per token and layer the
    q, k, v, o projections, scores and weighted values over every key (the full square: the kernel
    and XLA both compute masked blocks), the gated MLP; then the tied LM head."""
    d, f, h, kv, hd = (c[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads", "head_dim"))
    layer = 2 * d * h * hd + 2 * 2 * d * kv * hd + 2 * h * hd * d + 3 * 2 * d * f + 2 * 2 * seq * hd * h
    return batch * seq * (c["num_hidden_layers"] * layer + 2 * d * c["vocab_size"])


@pytest.mark.parametrize("attention", ["xla", "flash"])
def test_gemma2_forward_flops_match_a_hand_count(attention):
    """The jaxpr count of the text family's forward equals the decoder's closed form, with XLA
    attention and through the splash kernel's Pallas grid (the platform switch's costlier branch)."""
    from fraqat_jax.family import families
    from fraqat_jax.models import Gemma2ForCausalLM

    family = families()["gemma2"]
    model = nnx.eval_shape(lambda: Gemma2ForCausalLM(TINY_GEMMA, rngs=nnx.Rngs(0), scan_layers=True,
                                                     attention=attention))
    graph, state = nnx.split(model)
    b, seq = 3, 128
    spec = family.example_batch(TINY_GEMMA, seq_len=seq)
    assert spec == {"input_ids": ((seq,), "int32"), "attention_mask": ((seq,), "int32")}
    inputs = {k: jax.ShapeDtypeStruct((b, *shape), dtype) for k, (shape, dtype) in spec.items()}
    got = flops.count_flops(lambda st, x: family.apply(nnx.merge(graph, st), x), state, inputs)
    assert got == _decoder_forward_by_hand(TINY_GEMMA, b, seq)


def test_resolution_is_refused_for_a_text_teacher(capsys):
    assert plan.main(["--topology", "local", "--set", "resolution=512", *TINY_TEXT]) == 2
    err = capsys.readouterr().err
    assert "resolution=512" in err and "seq_len" in err and err.count("\n") == 1


@pytest.mark.slow
def test_text_family_plans_and_runs_locally(tmp_path, capsys):
    r = _local_plan(tmp_path, capsys, "--batch-size", "2", "--set", "attention=xla", "--run", "1", *TINY_TEXT)
    assert r["family"] == "gemma2" and r["seq_len"] == 128
    assert (r["tokens_per_example"], r["image_tokens"], r["text_tokens"]) == (128, 0, 128)
    assert r["resolution"] is None and r["latent_size"] is None and r["custom_kernels"] == 0
    forward = _decoder_forward_by_hand(TINY_GEMMA, 2, 128)
    assert r["flops"] == {"teacher_forward": forward, "student_forward": forward}
    assert r["flops_per_step"] == 4 * forward
    assert r["params"]["teacher"] == r["params"]["student"] > 0
    assert r["fits"] is True and r["measured_step_seconds"] > 0
    assert "seq_len 128" in capsys.readouterr().out


@needs_libtpu
@pytest.mark.slow
def test_tiny_gemma2_compiles_for_a_v5e_with_the_splash_kernel(tmp_path):
    """Without a TPU: the Gemma-2 step compiles for a TPU topology with the splash
    kernel in the program (and without it under attention=xla)."""
    kernels = {}
    for attention in ("flash", "xla"):
        proc, r = _plan_subprocess(tmp_path, "--topology", "v5e:2x2", "--batch-size", "4", "--set",
                                   f"attention={attention}", *TINY_TEXT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert r["fits"] is True and r["chips"] == 4 and r["family"] == "gemma2" and r["seq_len"] == 128
        assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["scan_layers"] is True
        assert r["flops_per_step"] == 4 * _decoder_forward_by_hand(TINY_GEMMA, 4, 128)
        kernels[attention] = r["custom_kernels"]
    assert kernels["flash"] > 0 and kernels["xla"] == 0
