"""Frechet distance between two sets of features (FID when the features are Inception pool3).

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})``.

The trace of the matrix square root is computed from symmetric eigendecompositions in float64:
``tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(S_1^{1/2} S_2 S_1^{1/2}))``, since ``S_1 S_2`` is similar
to the symmetric positive semi-definite ``S_1^{1/2} S_2 S_1^{1/2}``. This avoids the complex
round-off that ``scipy.linalg.sqrtm`` produces on nearly singular covariances (few samples, many
features), and needs no scipy at run time.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``features`` of shape ``(N, D)``."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes must be mu (D,), sigma (D, D) with one D; got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}"
        )
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt, 0.0))


def frechet_distance_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets ``(N1, D)`` and ``(N2, D)``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
