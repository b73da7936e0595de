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


def test_frozen_forward_is_an_integer_matmul(x_mlp):
    model = quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", weight_bits=4, channel_axis=-1)])
    frozen = freeze(model)
    jaxpr = jax.make_jaxpr(lambda x: frozen.layers[0](x))(x_mlp).jaxpr
    dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8]
    assert dots[0].params["preferred_element_type"] == jnp.int32


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
    frozen = freeze(model)
    nbytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(frozen)))
    assert any(isinstance(v, Codes) for _, v in nnx.to_flat_state(nnx.state(frozen)))
    assert nbytes <= 0.27 * bf16, nbytes / bf16


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
