"""Bit-width schedules: values, lengths, scaling, and use inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fraqat_jax import schedules as S


def test_staircase_example():
    s = S.staircase([(8, 3), (6, 2), (4, 5)])
    assert s.total_steps == 10
    np.testing.assert_array_equal(s.values(13), [8, 8, 8, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4])
    assert s(0).dtype == jnp.float32 and s(0).shape == ()
    assert float(s(10_000)) == 4.0


def test_paper_table4():
    s = S.fraqat(steps_per_epoch=3)
    assert s.total_steps == 75
    want = np.repeat([8, 7, 6, 5.5, 5, 4.75, 4.5, 4.25, 4], np.array([1, 1, 1, 1, 1, 2, 2, 2, 14]) * 3)
    np.testing.assert_array_equal(s.values(), want)


def test_baselines_share_budget_and_target():
    for fn in (S.integer, S.simple):
        s = fn(steps_per_epoch=2)
        assert s.total_steps == S.fraqat(2).total_steps == 50
        v = s.values()
        assert v[0] == (8 if fn is S.integer else 16)
        np.testing.assert_array_equal(v[-28:], 4.0)  # last 14 epochs at the target
    assert sorted({b for b, _ in S.integer().stages}) == [4, 5, 6, 7, 8]
    assert [b for b, _ in S.simple().stages] == [16, 8, 4]


def test_scale_to_keeps_proportions():
    v = S.scale_to(S.fraqat(), 25).values()
    np.testing.assert_array_equal(v[:12], [8, 7, 6, 5.5, 5, 4.75, 4.75, 4.5, 4.5, 4.25, 4.25, 4])
    big = S.scale_to(S.fraqat(), 2500)
    assert big.total_steps == 2500
    np.testing.assert_array_equal(big.values(), S.fraqat(100).values())
    small = S.scale_to(S.fraqat(), 5)
    assert small.total_steps == 5 and small.values()[-1] == 4.0


@settings(max_examples=12, deadline=None)
@given(total=st.integers(1, 400), name=st.sampled_from(S.NAMES))
def test_by_name_lengths_and_endpoints(total, name):
    s = S.by_name(name, total)
    assert s.total_steps == total
    v = s.values()
    assert len(v) == total
    assert v[-1] == 4.0 or total == 1 and name in ("linear", "cosine")
    assert np.all(np.diff(v) <= 1e-6)  # never goes back up
    assert v.min() >= 4.0 - 1e-6 and v.max() <= 16.0


def test_smooth_schedules_closed_form():
    n = 11
    t = np.arange(n) / (n - 1)
    np.testing.assert_allclose(S.linear(8, 4, n).values(), 8 - 4 * t, rtol=1e-6)
    np.testing.assert_allclose(S.cosine(8, 4, n).values(), 4 + 4 * (1 + np.cos(np.pi * t)) / 2, rtol=1e-6)
    assert float(S.linear(8, 4, n)(100)) == 4.0


def test_target_bits_shift():
    s = S.by_name("fraqat", 25, target_bits=3)
    np.testing.assert_array_equal(s.values()[:6], [7, 6, 5, 4.5, 4, 3.75])
    assert s.values()[-1] == 3
    assert S.by_name("constant", 7, target_bits=3).values().tolist() == [3.0] * 7


def test_inside_jit_compiles_once():
    traces = []
    s = S.by_name("fraqat", 50)

    @jax.jit
    def bits_at(step):
        traces.append(1)
        return s(step)

    got = [float(bits_at(jnp.int32(i))) for i in range(50)]
    assert len(traces) == 1
    np.testing.assert_array_equal(got, s.values())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: S.staircase([]), "empty"),
        (lambda: S.staircase([(8, 0)]), "num_steps"),
        (lambda: S.staircase([(1, 3)]), r"bits.*\[2, 16\]"),
        (lambda: S.staircase([(8,)]), "pair"),
        (lambda: S.fraqat(0), "steps_per_epoch=0"),
        (lambda: S.linear(8, 40, 10), "end=40"),
        (lambda: S.by_name("nope", 10), "'nope'.*fraqat"),
        (lambda: S.by_name("fraqat", 0), "total_steps=0"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("target", [3.0, 4.0])
def test_nested_widths_keep_target_grid_points(target):
    """A weight on a target-grid point keeps its place at every stage of ``nested``: with the
    library's quantizer (float32 bit-widths, as in training) its code is exactly 2^k times the
    target code; the numpy definition of the grid (qmax = 2^(b-1) - 1) gives the widths."""
    from fraqat_jax.quant import quantize_codes

    qmax_t = 2.0 ** (target - 1) - 1
    rng = np.random.default_rng(0)
    codes = rng.integers(-qmax_t, qmax_t + 1, size=(64, 32)).astype(np.float32)
    codes[0, 0] = qmax_t  # the tensor's max |w| sits on the grid's end, as after 4-bit training
    w = jnp.asarray(codes * np.float32(0.37 / qmax_t))
    widths = [b for b, _ in S.nested(target_bits=target).stages]
    assert widths[-1] == target and np.all(np.diff(widths) < 0)
    np.testing.assert_array_equal(np.asarray(quantize_codes(w, target)[0]), codes)
    for k, b in zip((4, 3, 2, 1), widths[:-1]):
        np.testing.assert_allclose(2.0 ** (b - 1) - 1, qmax_t * 2**k, rtol=0, atol=2e-3)  # the margin
        got, scale, _ = quantize_codes(w, jnp.float32(b))
        np.testing.assert_array_equal(np.asarray(got), codes * 2**k)
        np.testing.assert_allclose(np.asarray(got * scale), np.asarray(w), rtol=S.NESTED_MARGIN / (qmax_t * 2**k) + 1e-6)
    # A width off the nested set moves some of them (here FraQAT's target + 0.5).
    got, scale, _ = quantize_codes(w, jnp.float32(target + 0.5))
    assert np.abs(np.asarray(got * scale) - np.asarray(w)).max() > 1e-3


def test_early_schedules_reach_the_target_after_12_percent():
    for name, above in (("early", S.FRAQAT_STAGES[:-1]), ("nested_early", None)):
        s = S.by_name(name, 920)
        v = s.values()
        first = int(np.argmax(v == 4.0))
        assert first == 110, (name, first)  # 11 of 92 epochs above the target
        if above is not None:
            assert [b for b, _ in s.stages[:-1]] == [b for b, _ in above]
    assert [b for b, _ in S.by_name("nested_early", 920).stages] == [b for b, _ in S.nested().stages]


def test_every_schedule_name_is_a_trainer_choice_and_in_the_cli_help():
    from fraqat_jax.train import load_config
    from fraqat_jax.train.__main__ import build_parser

    help_text = build_parser().format_help()
    for name in S.NAMES:
        assert load_config(base={"schedule": name}).schedule == name
        assert name in help_text


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_early_ending_smooth_schedules(shape):
    """``linear:F`` / ``cosine:F`` descend over the first ``round(F * total)`` steps (numpy closed
    form), reach the target exactly where the paper's staircase does at F = 11/25, then hold it."""
    total = 225
    s = S.by_name(f"{shape}:0.44", total)
    span = int(np.floor(0.44 * total + 0.5))
    t = np.clip(np.arange(total) / span, 0.0, 1.0)
    ref = 8 - 4 * t if shape == "linear" else 4 + 4 * (1 + np.cos(np.pi * t)) / 2
    np.testing.assert_allclose(s.values(), ref, rtol=1e-6)
    first = int(np.argmax(s.values() == 4.0))
    assert first == int(np.argmax(S.by_name("fraqat", total).values() == 4.0)) == 99
    assert s.name == f"{shape}:0.44" and S.by_name(f"{shape}:", total).name == f"{shape}:0.44"
    np.testing.assert_allclose(S.scale_to(s, 2000).values()[880:], 4.0)  # the fraction survives rescaling
    assert S.is_smooth(f"{shape}:0.44") and not S.is_smooth("fraqat")
    from fraqat_jax.train import load_config

    assert load_config(base={"schedule": f"{shape}:0.44"}).schedule == f"{shape}:0.44"


@pytest.mark.parametrize("name,match", [("linear:0", r"\(0, 1\]"), ("linear:1.5", r"\(0, 1\]"),
                                        ("cosine:x", "'x'"), ("fraqat:0.5", "only linear and cosine"),
                                        ("lin:0.4", "unknown schedule")])
def test_early_ending_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        S.by_name(name, 100)
    from fraqat_jax.train import load_config
    from fraqat_jax.train.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(base={"schedule": name})
