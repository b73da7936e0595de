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
