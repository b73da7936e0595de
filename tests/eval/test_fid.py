"""Frechet distance against closed forms on Gaussians and a scipy.linalg.sqrtm reference."""

import numpy as np
import pytest
import scipy.linalg

from fraqat_jax.eval.fid import feature_statistics, frechet_distance, frechet_distance_from_features


def scipy_reference(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (1e-3 * np.eye(d) if rank is None else 0)


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_scaled_covariance_closed_form():
    # S2 = c^2 S1 commutes with S1: FD = |dmu|^2 + (1 - c)^2 tr(S1)
    rng = np.random.default_rng(1)
    s1 = random_spd(rng, 6)
    mu = rng.normal(size=6)
    got = frechet_distance(mu, s1, np.zeros(6), 4.0 * s1)
    assert got == pytest.approx(mu @ mu + np.trace(s1), rel=1e-9)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("d", [3, 32])
def test_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_reference(mu1, s1, mu2, s2), rel=1e-7)


def test_singular_covariances_stay_finite_and_nonnegative():
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 20, rank=4), random_spd(rng, 20, rank=4)
    got = frechet_distance(np.zeros(20), s1, np.zeros(20), s2)
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(scipy_reference(np.zeros(20), s1, np.zeros(20), s2), rel=1e-4, abs=1e-6)


def test_from_samples_converges_to_gaussian_closed_form():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    y = rng.normal(size=(20000, 2)) * [3.0, 2.0] + [1.0, 0.0]
    # |dmu|^2 = 1, (sqrt(1) - sqrt(9))^2 = 4, (2 - 2)^2 = 0
    assert frechet_distance_from_features(x, y) == pytest.approx(5.0, rel=0.03)
    mu, s = feature_statistics(x)
    np.testing.assert_allclose(s, np.cov(x.T), rtol=1e-12)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(np.zeros((1, 3)))
