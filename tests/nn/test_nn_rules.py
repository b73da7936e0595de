"""quantize_model / Rule / set_bits / apply_schedules on a tiny MLP and a tiny transformer."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from nn_models import MLP, TRANSFORMER_LINEARS, np_sym_quant, np_token_quant
from flax import nnx

import fraqat_jax
from fraqat_jax import schedules
from fraqat_jax.nn import (Bits, QuantConv, QuantLinear, Rule, apply_schedules, bits_of, quantize_model,
                           quantized_layers, set_bits)


forward = nnx.jit(lambda model, x: model(x))


def _param_shapes(model):
    return {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_default_rules_quantize_every_linear_at_w8a8_keeping_param_names(transformer):
    before = _param_shapes(transformer)
    model = fraqat_jax.quantize_model(transformer)
    assert _param_shapes(model) == before
    layers = dict(quantized_layers(model))
    assert sorted(layers) == TRANSFORMER_LINEARS
    assert all(isinstance(layer, QuantLinear) for layer in layers.values())
    assert set(bits_of(model).values()) == {8.0}
    assert all(layer.act_bits == 8.0 and layer.act_granularity == "token" for layer in layers.values())


def test_quantized_forward_matches_numpy_reference(mlp, x_mlp):
    """Effective weights lie on quantize's grid and the layer computes q(x) @ q(W) + b."""
    model = quantize_model(mlp, [Rule(r"layers\.\d", weight_bits=4.5, act_bits=8)])
    layer = model.layers[0]
    w = np.asarray(layer.kernel[...])
    eff = np.asarray(layer.quantized_kernel())
    ref_w, codes, scale = np_sym_quant(w, 4.5)
    np.testing.assert_allclose(eff, ref_w, rtol=1e-6, atol=1e-7)
    assert codes.min() >= -22 and codes.max() <= 21  # INT4.5: [-floor(2^3.5), floor(2^3.5) - 1]
    np.testing.assert_array_equal(eff, np.asarray(fraqat_jax.quantize(layer.kernel[...], 4.5)))
    y = np.asarray(layer(x_mlp))
    ref = np_token_quant(x_mlp, 8) @ ref_w + np.asarray(layer.bias[...])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_error_against_full_precision_grows_as_bits_fall(transformer, x_tokens):
    y_fp = forward(transformer, x_tokens)
    model = quantize_model(transformer, [Rule(".*", weight_bits=8, act_bits=None)])
    errors = []
    for bits in (8, 6, 5, 4, 3):
        set_bits(model, bits)
        errors.append(float(jnp.sqrt(jnp.mean((forward(model, x_tokens) - y_fp) ** 2))))
    assert errors[0] > 0
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


def test_rules_first_match_wins_and_excluded_layers_stay_exact(transformer, x_tokens):
    ref_proj_out = nnx.clone(transformer.proj_out)
    rules = [
        Rule("proj_out", weight_bits=None, act_bits=None),           # exact
        Rule(r".*\.attn\.to_q", weight_bits=6, act_bits=None),
        Rule(r".*\.attn\..*", weight_bits=5),
        Rule(".*", weight_bits=4, channel_axis=-1),
    ]
    model = quantize_model(transformer, rules)
    assert type(model.proj_out) is nnx.Linear
    h = jax.random.normal(jax.random.key(3), (3, 32))
    np.testing.assert_array_equal(model.proj_out(h), ref_proj_out(h))
    bits = bits_of(model)
    assert bits["transformer_blocks.1.attn.to_q"] == 6.0
    assert bits["transformer_blocks.1.attn.to_k"] == 5.0
    assert bits["transformer_blocks.0.ff.net.1"] == 4.0
    assert model.transformer_blocks[0].attn.to_q.act_bits is None
    assert model.transformer_blocks[0].ff.net[1].channel_axis == -1
    assert "proj_out" not in bits


def test_layers_in_nnx_list_python_list_and_nested_modules(transformer):
    model = quantize_model(transformer)
    assert isinstance(model.transformer_blocks[1].attn.to_out[0], QuantLinear)  # python list
    assert isinstance(model.transformer_blocks[1].ff.net[1], QuantLinear)  # nnx.List
    assert isinstance(model.transformer_blocks[0].ff.net[0].proj, QuantLinear)  # nested module


def test_root_layer_and_conv_and_sharding_metadata():
    with nnx.use_eager_sharding(False):
        lin = nnx.Linear(4, 6, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                         rngs=nnx.Rngs(0))
    q = quantize_model(lin)
    assert isinstance(q, QuantLinear)
    assert q.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"'\.\*'"):
        assert type(quantize_model(conv)) is nnx.Conv  # default rules: linear layers only
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    ref = forward(conv, x)
    qc = quantize_model(conv, [Rule(".*", weight_bits=8, act_bits=8)])
    assert isinstance(qc, QuantConv) and qc.act_granularity == "tensor"
    assert float(jnp.max(jnp.abs(forward(qc, x) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    with pytest.raises(ValueError, match="token"):
        quantize_model(nnx.clone(conv), [Rule(".*", act_granularity="token")])


def test_einsum_layer_computes_on_quantized_kernel_and_input():
    ein = nnx.Einsum("btd,dh->bth", (16, 8), (8,), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 3, 16))
    q = quantize_model(ein, [Rule(".*", weight_bits=5, act_bits=8)])
    assert q.act_granularity == "tensor"
    xn = np.asarray(x, np.float64)
    lo, hi = xn.min(), xn.max()
    scale = (hi - lo) / 255
    xq = np.clip(np.round((xn - lo) / scale), 0, 255) * scale + lo
    want = np.einsum("btd,dh->bth", xq, np_sym_quant(np.asarray(q.kernel[...]), 5)[0]) + np.asarray(q.bias[...])
    np.testing.assert_allclose(np.asarray(forward(q, x)), want, rtol=1e-5, atol=1e-5)


def test_unmatched_rule_warns_and_bad_rules_raise(mlp):
    with pytest.warns(UserWarning, match="no_such_layer"):
        quantize_model(mlp, [Rule("no_such_layer"), Rule(".*")])
    for bad in (1, 17, float("nan"), float("inf"), "4"):
        with pytest.raises(ValueError, match="weight_bits"):
            Rule(".*", weight_bits=bad)
    with pytest.raises(ValueError, match="act_bits"):
        Rule(".*", act_bits=12)
    with pytest.raises(ValueError, match="act_granularity"):
        Rule(".*", act_granularity="channel")
    with pytest.raises(ValueError, match="regular expression"):
        Rule("(")
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(MLP(rngs=nnx.Rngs(0)), [Rule(".*", channel_axis=-1, group_size=5)])
    q = quantize_model(MLP(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="bits"):
        set_bits(q, 1.5)
    with pytest.raises(ValueError, match="matched no"):
        set_bits(q, 4, pattern="nothing")


def test_set_bits_on_state_and_pattern(mlp):
    model = quantize_model(mlp)
    graphdef, state = nnx.split(model)
    new_state = set_bits(state, 5.5, pattern=r"layers\.[01]")
    assert isinstance(new_state, nnx.State)
    assert bits_of(nnx.merge(graphdef, new_state)) == {"layers.0": 5.5, "layers.1": 5.5, "layers.2": 8.0}
    assert set(bits_of(nnx.merge(graphdef, state)).values()) == {8.0}  # input untouched


def test_per_rule_schedules_follow_apply_schedules(mlp):
    pinned = schedules.constant(8)
    stair = schedules.staircase([(8, 2), (6, 2), (4, 1)])
    model = quantize_model(mlp, [Rule("layers.0", weight_bits=pinned), Rule("layers.1", weight_bits=stair),
                                 Rule(".*", weight_bits=8)])
    for step, want in [(0, 8.0), (2, 6.0), (4, 4.0), (9, 4.0)]:
        set_bits(model, 3)
        apply_schedules(model, step)
        assert bits_of(model) == {"layers.0": 8.0, "layers.1": want, "layers.2": 3.0}
    graphdef, state = nnx.split(model)
    state = apply_schedules(state, jnp.int32(2))
    assert bits_of(nnx.merge(graphdef, state))["layers.1"] == 6.0


def test_jitted_step_over_whole_schedule_traces_once_and_grads_every_kernel(transformer, x_tokens):
    """merge -> set_bits(traced) -> split out nnx.Param -> grad -> optimizer, jitted once for 8 -> 4."""
    y_teacher = forward(transformer, x_tokens)
    student = quantize_model(nnx.clone(transformer))
    schedule = schedules.fraqat(1)  # 25 steps: 8, 7, 6, 5.5, 5, 4.75, 4.75, ..., 4
    graphdef, state = nnx.split(student)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(state.filter(nnx.Param))
    assert not any(isinstance(v, Bits) for v in jax.tree.leaves(opt_state, is_leaf=lambda v: isinstance(v, Bits)))
    traces = []

    @jax.jit
    def step(state, opt_state, step_index):
        traces.append(1)
        model = nnx.merge(graphdef, state)
        set_bits(model, schedule(step_index))
        gdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p):
            return jnp.mean((nnx.merge(gdef, p, rest)(x_tokens) - y_teacher) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return nnx.merge_state(params, rest), opt_state, loss, grads

    seen_bits, losses = [], []
    for i in range(schedule.total_steps):
        state, opt_state, loss, grads = step(state, opt_state, jnp.int32(i))
        seen_bits.append(bits_of(nnx.merge(graphdef, state))["proj_in"])
        losses.append(float(loss))
    assert len(traces) == 1
    assert seen_bits == [float(b) for b in schedule.values()]
    assert seen_bits[0] == 8.0 and seen_bits[-1] == 4.0 and 5.5 in seen_bits
    assert all(np.isfinite(losses)) and losses[0] > 0
    kernel_grads = {p: g for p, g in nnx.to_flat_state(grads) if p[-1] == "kernel"}
    assert len(kernel_grads) == len(TRANSFORMER_LINEARS)
    for path, g in kernel_grads.items():
        assert float(jnp.max(jnp.abs(g))) > 0, path
