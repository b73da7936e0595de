"""freeze(): integer codes, integer matmul, agreement with the fake-quant model, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_models import MLP
from flax import nnx

from fraqat_jax.nn import (Codes, FrozenConv, FrozenLinear, QuantLinear, Rule, calibrate, freeze,
                           quantize_model, set_bits)
from fraqat_jax.nn.freeze import unpack_nibbles
from fraqat_jax.quant import quantize_codes

forward = nnx.jit(lambda model, x: model(x))

LINEAR_CASES = [
    # weight bits, symmetric, channel_axis, group_size, act_bits, act_granularity (or "static": act_ranges)
    (4, True, None, None, 8, "token"),
    (4, True, -1, None, 8, "tensor"),
    (3, False, -1, 8, 8, "token"),
    (5.5, True, -1, None, None, None),
    (8, False, None, None, 8, "static"),
    (4.25, True, -1, 16, 6, "static"),
]


@pytest.mark.parametrize("bits,symmetric,axis,group,act_bits,gran", LINEAR_CASES)
def test_frozen_linear_matches_fake_quant(bits, symmetric, axis, group, act_bits, gran, x_mlp):
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=bits, act_bits=act_bits, symmetric=symmetric,
                                                        channel_axis=axis, group_size=group,
                                                        act_granularity=None if gran == "static" else gran,
                                                        act_ranges="static" if gran == "static" else "dynamic")])
    if gran == "static":
        calibrate(model, [x_mlp, 0.5 * x_mlp])
    frozen = freeze(model)
    assert isinstance(model.layers[0], QuantLinear)  # the input model is left alone
    assert all(isinstance(layer, FrozenLinear) for layer in frozen.layers)
    fake, served = forward(model, x_mlp), forward(frozen, x_mlp)
    err = float(jnp.max(jnp.abs(fake - served)))
    assert err <= 1e-4 * float(jnp.max(jnp.abs(fake))), err
    # Stored codes are quantize_codes' codes (shifted by 8/128 when asymmetric), packed at <= 4 bits.
    layer, stored = model.layers[1], frozen.layers[1]
    codes, _, _ = quantize_codes(layer.kernel[...], bits, symmetric=symmetric, channel_axis=axis, group_size=group)
    shift = 0 if symmetric else (8 if bits <= 4 else 128)
    assert stored.kernel_codes[...].dtype == (jnp.uint8 if bits <= 4 else jnp.int8)
    np.testing.assert_array_equal(np.asarray(stored.weight_codes(), np.float32), np.asarray(codes) - shift)


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (cond branches, scans, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_frozen_forward_is_an_integer_matmul(x_mlp):
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4, channel_axis=-1)])
    frozen = freeze(model)
    layer = frozen.layers[0]
    assert layer.matmul == "auto"
    layer.matmul = "dense"
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(x_mlp).jaxpr
    dots = [eqn for eqn in _eqns(jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8]
    assert dots[0].params["preferred_element_type"] == jnp.int32
    # "auto" holds both forms, chosen per platform when lowered: the dense int8 matmul and the
    # blocked float32 one.
    layer.matmul = "auto"
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(x_mlp).jaxpr
    dots = [eqn for eqn in _eqns(jaxpr) if eqn.primitive.name == "dot_general"]
    kinds = {tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in dots}
    assert kinds == {("int8", "int8"), ("float32", "float32")}, kinds
    layer.matmul = "sparse"
    with pytest.raises(ValueError, match="'sparse'.*auto, blocked, dense"):
        layer(x_mlp)


def _random_codes(rng, shape, packed):
    lo, hi = (-8, 8) if packed else (-128, 128)
    return rng.integers(lo, hi, shape).astype(np.int8)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tokens,groups", [(1, 1), (3, 4), (20, 1)])
def test_blocked_code_matmul_is_exact(packed, tokens, groups):
    """The blocked float32 form gives the integer sums exactly (numpy int64 reference), with
    several blocks per group (block_rows < group)."""
    from fraqat_jax.nn.freeze import block_rows, blocked_code_matmul, exact_in_float32, pack_nibbles
    rng = np.random.default_rng(tokens * 10 + groups)
    n_in, n_out = (512 if packed else 256), 4096
    g = n_in // groups
    assert block_rows(g, n_out, tokens) < g and exact_in_float32(g, packed)
    codes = _random_codes(rng, (n_in, n_out), packed)
    stored = pack_nibbles(codes) if packed else jnp.asarray(codes)
    x = rng.integers(-128, 128, (tokens, groups, g))
    got = jax.jit(blocked_code_matmul, static_argnums=(2, 3))(jnp.asarray(x, jnp.float32), stored, (n_in, n_out),
                                                            packed)
    ref = np.einsum("mGi,Gio->mGo", x.astype(np.int64), codes.astype(np.int64).reshape(groups, g, n_out))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tokens,groups,n_in,n_out", [(1, 1, 512, 768), (2, 4, 512, 128), (1, 1, 9216, 4)])
def test_fused_code_matmul_is_exact(packed, tokens, groups, n_in, n_out):
    """The fused form (few input rows) gives the integer sums exactly (numpy int64 reference): several
    steps and column chunks, groups, and a group long enough (9216 rows of extreme codes) that packed
    codes must be summed signed rather than shifted to [0, 15]."""
    from fraqat_jax.nn.freeze import FUSED_ROWS, fused_code_matmul, pack_nibbles
    rng = np.random.default_rng(tokens * 10 + groups)
    g = n_in // groups
    assert g > FUSED_ROWS
    codes = _random_codes(rng, (n_in, n_out), packed)
    x = rng.integers(-128, 128, (tokens, groups, g))
    if n_in == 9216:  # the largest sums: every term 128 * 8
        codes[:], x[:] = (-8 if packed else -128), -128
    stored = pack_nibbles(codes) if packed else jnp.asarray(codes)
    got = jax.jit(fused_code_matmul, static_argnums=(2, 3))(jnp.asarray(x, jnp.float32), stored, (n_in, n_out), packed)
    ref = np.einsum("mGi,Gio->mGo", x.astype(np.int64), codes.astype(np.int64).reshape(groups, g, n_out))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


@pytest.mark.parametrize("bits,symmetric,axis,group,act_bits,n_in,n_out", [
    (4, True, None, None, 8, 512, 2048),  # the default rules, several blocks
    (3, False, -1, 64, 8, 256, 1024),     # asymmetric, grouped
    (8, True, -1, None, 8, 512, 1024),    # int8 codes
    (4, True, -1, None, 8, 64, 9),        # odd out: packed pairs straddle rows, dense on every platform
    (8, True, None, None, 8, 1024, 16),   # beyond float32's exact sums: dense on every platform
    (4, True, -1, None, None, 512, 1024), # float input (W4A16)
])
def test_blocked_and_dense_forms_agree(bits, symmetric, axis, group, act_bits, n_in, n_out):
    """With quantized inputs both forms give the same bits; with float inputs, float32 rounding."""
    model = quantize_model(nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0)),
                           [Rule(".*", weight_bits=bits, act_bits=act_bits, symmetric=symmetric, channel_axis=axis,
                                 group_size=group)])
    frozen = freeze(model)
    x = jax.random.normal(jax.random.key(3), (2, 3, n_in))
    outs = {}
    for form in ("blocked", "dense", "auto"):
        frozen.matmul = form
        outs[form] = np.asarray(forward(frozen, x))
    np.testing.assert_array_equal(outs["auto"], outs["blocked"])  # this test runs on CPU
    if act_bits is None:
        np.testing.assert_allclose(outs["blocked"], outs["dense"], rtol=0, atol=1e-5 * np.abs(outs["dense"]).max())
    else:
        np.testing.assert_array_equal(outs["blocked"], outs["dense"])
    fake = np.asarray(forward(model, x))
    assert np.abs(outs["auto"] - fake).max() <= 1e-4 * np.abs(fake).max()


def _largest_buffer(compiled_text, skip_parameters=True):
    """Element count of the largest array any instruction of an optimized HLO module produces (a
    bitcast or a tuple element of another array holds no memory of its own, so neither counts)."""
    import re
    sizes = []
    for line in compiled_text.splitlines():
        m = re.match(r"\s*(ROOT )?%\S+ = (\w+)\[([\d,]*)\]", line)
        if not m or (skip_parameters and " parameter(" in line) or " bitcast(" in line or " get-tuple-element(" in line:
            continue
        sizes.append(int(np.prod([int(d) for d in m.group(3).split(",") if d] or [1])))
    return max(sizes)


@pytest.mark.parametrize("tokens", [1, 32])
def test_cpu_form_never_widens_the_whole_kernel(tokens):
    """On CPU the compiled frozen layer never holds the unpacked (or widened) kernel up to
    BLOCKED_MAX_TOKENS input rows: every array is smaller than the kernel, with the codes packed or
    (the CPU default) also held unpacked; on the packed codes the dense form does unpack it whole
    (so the check can fail), and "auto" runs it for longer inputs."""
    from fraqat_jax.nn.freeze import BLOCKED_MAX_TOKENS
    assert tokens <= BLOCKED_MAX_TOKENS
    n_in, n_out = 512, 2048
    model = quantize_model(nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4)])
    x = jax.ShapeDtypeStruct((tokens, n_in), jnp.float32)

    def compiled(frozen, form):
        frozen.matmul = form
        graphdef, state = nnx.split(frozen)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().as_text()

    frozen = freeze(model)
    assert frozen.kernel_unpacked is not None  # the CPU layout
    assert _largest_buffer(compiled(frozen, "auto")) < n_in * n_out
    frozen = freeze(model, unpack=False)
    assert _largest_buffer(compiled(frozen, "auto")) < n_in * n_out
    assert _largest_buffer(compiled(frozen, "dense")) >= n_in * n_out
    x = jax.ShapeDtypeStruct((BLOCKED_MAX_TOKENS + 1, n_in), jnp.float32)
    assert _largest_buffer(compiled(frozen, "auto")) >= n_in * n_out


def test_float_path_holds_its_kernel(x_mlp):
    """The float path rebuilds ``codes * scale`` once, at freezing: the forward has no kernel-sized op."""
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4, channel_axis=-1)])
    frozen = freeze(model, integer=False)
    layer = frozen.layers[0]
    np.testing.assert_array_equal(layer.kernel_float[...], layer.fake_quant_kernel())
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(x_mlp).jaxpr
    assert not [e for e in _eqns(jaxpr) if any(getattr(v.aval, "shape", None) == layer.kernel_shape for v in e.outvars)]
    np.testing.assert_array_equal(forward(frozen, x_mlp), forward(model, x_mlp))  # bit for bit


def test_pack_roundtrip():
    codes = jnp.arange(-8, 8, dtype=jnp.int32).reshape(4, 4)[:, :3]  # odd total size after slicing rows
    codes = codes[:3]
    from fraqat_jax.nn.freeze import pack_nibbles
    packed = pack_nibbles(codes)
    assert packed.dtype == jnp.uint8 and packed.size == (codes.size + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, codes.shape), codes)


@pytest.mark.parametrize("gran,axis,act_bits", [("tensor", -1, 8), ("static", None, 8), ("tensor", None, None)])
def test_frozen_conv_matches_fake_quant(gran, axis, act_bits):
    conv = nnx.Conv(3, 8, (3, 3), strides=1, padding="SAME", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3)) + 0.5
    model = quantize_model(conv, [Rule(".*", weight_bits=4, act_bits=act_bits, channel_axis=axis,
                                       act_granularity=gran if act_bits and gran != "static" else None,
                                       act_ranges="static" if gran == "static" else "dynamic")])
    if gran == "static" and act_bits:
        calibrate(model, [x])
    frozen = freeze(model)
    assert isinstance(frozen, FrozenConv)
    fake, served = forward(model, x), forward(frozen, x)
    assert float(jnp.max(jnp.abs(fake - served))) <= 1e-4 * float(jnp.max(jnp.abs(fake)))


def test_frozen_w4_per_channel_bytes_within_bound():
    model = quantize_model(MLP((512, 1024, 512), rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4, channel_axis=-1)])
    bf16 = sum(v[...].size * 2 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    frozen = freeze(model, unpack=False)
    nbytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(frozen)))
    assert any(isinstance(v, Codes) for _, v in nnx.to_flat_state(nnx.state(frozen)))
    assert nbytes <= 0.27 * bf16, nbytes / bf16
    # The CPU layout adds the unpacked codes, one byte per weight, and nothing else.
    wide = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(freeze(model, unpack=True))))
    kernels = sum(v[...].size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "kernel")
    assert wide - nbytes == kernels


def test_freeze_errors():
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=8)])
    set_bits(model, 9)
    with pytest.raises(ValueError, match="layers.0.*<= 8"):
        freeze(model)
    conv = quantize_model(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), [Rule(".*", symmetric=False)])
    with pytest.raises(ValueError, match="asymmetric"):
        freeze(conv)
    ein = quantize_model(nnx.Einsum("btd,dh->bth", (4, 5), rngs=nnx.Rngs(0)), [Rule(".*")])
    with pytest.raises(NotImplementedError, match="einsum"):
        freeze(ein)


def test_int4_layout_matches_packed(x_mlp):
    """``freeze(int4=True)`` holds the same codes as jnp.int4 and computes the same bits."""
    model = quantize_model(nnx.Linear(256, 1024, rngs=nnx.Rngs(0)),
                           [Rule(".*", weight_bits=4, symmetric=False, channel_axis=-1, group_size=64)])
    packed, int4 = freeze(model), freeze(model, int4=True)
    assert int4.kernel_codes[...].dtype == jnp.int4 and int4.kernel_codes[...].shape == (256, 1024)
    np.testing.assert_array_equal(int4.weight_codes(), packed.weight_codes())
    x = jax.random.normal(jax.random.key(4), (3, 256))
    for form in ("blocked", "dense"):
        packed.matmul = int4.matmul = form
        np.testing.assert_array_equal(forward(int4, x), forward(packed, x))


_TPU_COMPILE = """
import json, sys
from fraqat_jax.plan.topology import parse_topology, prepare_environment, topology_devices
top = parse_topology("v5e:1x1")
prepare_environment(top)
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import SingleDeviceSharding
from fraqat_jax.nn import Rule, freeze, quantize_model
sh = SingleDeviceSharding(topology_devices(top)[0])
model = quantize_model(nnx.Linear(512, 2048, use_bias=False, rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4)])
out = {}
for int4 in (False, True):
    graphdef, state = nnx.split(freeze(model, int4=int4))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state)
    for tokens in (1,):  # decode: the case the int4 layout exists for (one compile per layout keeps it quick)
        x = jax.ShapeDtypeStruct((tokens, 512), jnp.float32, sharding=sh)
        compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(abstract, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[f"{int4}/{tokens}"] = {"bytes": cost["bytes accessed"], "hlo": compiled.as_text()}
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_reads_int4_codes_in_the_matmul_and_unpacks_packed_ones():
    """Compiled for a v5e (libtpu, no TPU needed): with jnp.int4 codes the program writes no array
    wider than 4 bits of the kernel's size (the widening happens inside the matmul's fusion) and reads
    about the codes' bytes; with packed uint8 codes the unpacked kernel is written out (the unpack is
    not fused into the matmul)."""
    import os
    import pathlib
    import subprocess
    import sys
    repo = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": ""}
    proc = subprocess.run([sys.executable, "-c", _TPU_COMPILE], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    import re
    out = json.loads(proc.stdout)
    kernel = 512 * 2048

    def widest_kernel_sized(hlo):  # dtypes of the kernel-sized arrays the program writes (its top level)
        entry = hlo[hlo.index("\nENTRY"):]
        entry = entry[:entry.index("\n}")]
        return sorted({m.group(1) for m in re.finditer(r"= (\w+)\[([\d,]+)\]", entry)
                       if np.prod([int(d) for d in m.group(2).split(",")]) >= kernel and m.group(1) != "s4"})

    for tokens in (1,):
        int4, packed = out[f"True/{tokens}"], out[f"False/{tokens}"]
        assert widest_kernel_sized(int4["hlo"]) == [], widest_kernel_sized(int4["hlo"])
        assert widest_kernel_sized(packed["hlo"]) != []
        assert int4["bytes"] * 10 < packed["bytes"], (int4["bytes"], packed["bytes"])
    assert out["True/1"]["bytes"] < kernel  # about the int4 codes (kernel / 2 bytes) and the vectors


@pytest.mark.parametrize("n_out", [96, 75])
def test_unpacked_cpu_layout_gives_the_packed_bits(n_out):
    """The CPU layout (codes also held unpacked, one int8 each) gives the packed layout's output bit
    for bit in every form, at one token and at many; an odd width, which the packed CPU forms cannot
    split into nibble pairs, runs the blocked form on the unpacked codes."""
    model = quantize_model(nnx.Linear(128, n_out, rngs=nnx.Rngs(0)),
                           [Rule(".*", weight_bits=4, channel_axis=-1)])
    wide, packed = freeze(model, unpack=True), freeze(model, unpack=False)
    np.testing.assert_array_equal(wide.kernel_unpacked[...], unpack_nibbles(packed.kernel_codes[...], (128, n_out)))
    for tokens in (1, 40):
        x = jax.random.normal(jax.random.key(tokens), (tokens, 128))
        want = np.asarray(packed(x))  # "auto"
        for form in ("auto", "blocked", "fused", "dense"):
            wide.matmul = form
            np.testing.assert_array_equal(np.asarray(wide(x)), want, err_msg=f"{form}, {tokens} tokens")
