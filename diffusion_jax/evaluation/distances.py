"""Distances between two sets of features (N, D): Frechet distance and kernel distance.

    FD  = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})
          (Heusel et al. 2017: FID when the features are Inception's)
    KD  = unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3   (Binkowski et al. 2018: KID),
          averaged over `num_subsets` random subsets of size `subset_size`

Computed in float64 numpy (small D): the matrix square root of the symmetric PSD product comes
from eigendecompositions, so no scipy is needed.
"""
from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "kernel_distance", "gaussian_frechet_distance"]


def _check(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) arrays with the same D, got {a.shape} and "
                         f"{b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    return a, b


def _sqrt_psd(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """The Frechet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    s = _sqrt_psd(cov_a)
    cross = _sqrt_psd(s @ cov_b @ s)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                 - 2.0 * np.trace(cross))


def frechet_distance(a, b) -> float:
    """FD between Gaussians fitted to the features a (N, D) and b (M, D)."""
    a, b = _check(a, b)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                     np.cov(b, rowvar=False))


def kernel_distance(a, b, *, num_subsets: int = 50, subset_size: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3."""
    a, b = _check(a, b)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        vals.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    vals = np.asarray(vals)
    return float(vals.mean()), float(vals.std())
