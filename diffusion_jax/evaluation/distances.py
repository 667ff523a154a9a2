"""Distances between two sets of features (N, D): Frechet distance and kernel distance.

    FD  = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})
          (Heusel et al. 2017: FID when the features are Inception's)
    KD  = unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3   (Binkowski et al. 2018: KID),
          averaged over `num_subsets` random subsets of size `subset_size`

Computed in float64 numpy (small D): the matrix square root of the symmetric PSD product comes
from eigendecompositions. `sqrtm_frechet_distance` is pytorch-fid's variant instead (scipy's
sqrtm of the non-symmetric S_a S_b, eps I added to both covariances if the product is singular,
a small imaginary part dropped): the one published FIDs are computed with.
"""
from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "kernel_distance", "gaussian_frechet_distance",
           "sqrtm_frechet_distance", "polynomial_mmd2"]


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


def sqrtm_frechet_distance(mu_a, cov_a, mu_b, cov_b, eps: float = 1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance`, float64: ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b)
    - 2 tr(sqrtm(S_a S_b)); if sqrtm is not finite, sqrtm((S_a + eps I)(S_b + eps I)); the
    imaginary part is dropped (ValueError if a diagonal entry's exceeds 1e-3)."""
    from scipy import linalg
    mu_a, mu_b = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu_a, mu_b))
    cov_a, cov_b = (np.atleast_2d(np.asarray(c, np.float64)) for c in (cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape} and {mu_b.shape}, "
                         f"covariances {cov_a.shape} and {cov_b.shape}")
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def polynomial_mmd2(x, y, *, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> float:
    """Unbiased MMD^2 of x, y (m, D) with k(a, b) = (gamma a.b + coef0)^degree (gamma = 1/D
    if None): off-diagonal means of K_xx and K_yy minus 2 mean(K_xy) (Binkowski et al. 2018)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"MMD needs two sets of equal size >= 2, got {len(x)} and {len(y)}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * g + coef0) ** degree
    kyy = (y @ y.T * g + coef0) ** degree
    kxy = (x @ y.T * g + coef0) ** degree
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def frechet_distance(a, b) -> float:
    """FD between Gaussians fitted to the features a (N, D) and b (M, D)."""
    a, b = _check(a, b)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                     np.cov(b, rowvar=False))


def kernel_distance(a, b, *, num_subsets: int = 50, subset_size: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3."""
    a, b = _check(a, b)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = np.asarray([polynomial_mmd2(a[rng.choice(len(a), m, replace=False)],
                                       b[rng.choice(len(b), m, replace=False)])
                       for _ in range(num_subsets)])
    return float(vals.mean()), float(vals.std())
