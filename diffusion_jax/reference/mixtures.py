"""Closed forms for Gaussian-mixture data under any linear Gaussian process.

For data p_0 = sum_k w_k N(mu_k, S_k) and x_t = alpha x_0 + sigma eps, the marginal is again a mixture

    p_t(x) = sum_k w_k N(x; alpha mu_k, C_k(t)),     C_k(t) = alpha^2 S_k + sigma^2 I,

so everything below is exact at every t:

    score    grad log p_t(x) = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k),   r_k = posterior of component k
    eps      eps(x, t) = -sigma grad log p_t(x)
    x0       E[x_0 | x_t] = sum_k r_k (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k))

Each S_k is diagonalised once (S_k = U_k diag(e_k) U_k^T), so C_k(t) = U_k diag(alpha^2 e_k + sigma^2) U_k^T
costs nothing per t, and for one Gaussian the probability-flow ODE has the closed-form flow map

    x_t = alpha_t mu + C(t)^{1/2} C(s)^{-1/2} (x_s - alpha_s mu).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import Process, as_time


class GaussianMixture(NamedTuple):
    """A pytree: weights (K,), means (K, D), covs (K, D, D) and their eigendecomposition."""

    weights: jax.Array
    means: jax.Array
    covs: jax.Array
    evals: jax.Array
    evecs: jax.Array

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]


def make_mixture(weights, means, covs) -> GaussianMixture:
    """Validates and diagonalises a mixture (covariances must be symmetric positive definite)."""
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    cov = np.asarray(covs, np.float64)
    if mu.ndim != 2 or w.shape != (mu.shape[0],) or cov.shape != (mu.shape[0], mu.shape[1], mu.shape[1]):
        raise ValueError(
            f"mixture shapes must be weights (K,), means (K, D), covs (K, D, D); got {w.shape}, {mu.shape}, {cov.shape}"
        )
    if np.any(w <= 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"mixture weights must be positive and sum to 1, got {w}")
    e, u = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, -1, -2)))
    if np.any(e <= 0):
        raise ValueError("mixture covariances must be positive definite")
    f = jnp.float32
    return GaussianMixture(jnp.asarray(w, f), jnp.asarray(mu, f), jnp.asarray(cov, f), jnp.asarray(e, f), jnp.asarray(u, f))


def ring_mixture(num_components: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """K isotropic 2-D Gaussians evenly spaced on a circle, equal weights."""
    ang = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
    covs = np.tile(std ** 2 * np.eye(2), (num_components, 1, 1))
    return make_mixture(np.full(num_components, 1.0 / num_components), means, covs)


def random_mixture(seed: int = 0, dim: int = 16, num_components: int = 4, mean_scale: float = 1.5,
                   eig_range: tuple[float, float] = (0.05, 0.5)) -> GaussianMixture:
    """A reproducible random mixture: Gaussian means, random rotations with eigenvalues in eig_range,
    Dirichlet-ish unequal weights."""
    rng = np.random.default_rng(seed)
    means = mean_scale * rng.standard_normal((num_components, dim))
    covs = []
    for _ in range(num_components):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        e = rng.uniform(*eig_range, size=dim)
        covs.append(q @ np.diag(e) @ q.T)
    w = rng.uniform(1.0, 2.0, num_components)
    return make_mixture(w / w.sum(), means, np.stack(covs))


def gaussian(mean, cov) -> GaussianMixture:
    """A single Gaussian as a one-component mixture."""
    mean = np.asarray(mean, np.float64)
    return make_mixture(np.ones(1), mean[None], np.asarray(cov, np.float64)[None])


# ----------------------------------------------------------------------------------------------
def sample(gm: GaussianMixture, key, n: int) -> tuple[jax.Array, jax.Array]:
    """n samples of p_0 and their component indices."""
    kc, kz = jax.random.split(key)
    comp = jax.random.categorical(kc, jnp.log(gm.weights), shape=(n,))
    z = jax.random.normal(kz, (n, gm.dim))
    u, e = gm.evecs[comp], gm.evals[comp]
    x = gm.means[comp] + jnp.einsum("nij,nj->ni", u, jnp.sqrt(e) * z)
    return x, comp


def _coefs(process: Process | None, t, n):
    if process is None:
        one = jnp.ones((n,), jnp.float32)
        return one, jnp.zeros((n,), jnp.float32)
    t = jnp.broadcast_to(as_time(t), (n,))
    return process.alpha(t), process.sigma(t)


def _components(gm: GaussianMixture, x, a, s):
    """Per-component log N(x; a mu_k, C_k) and C_k^{-1}(x - a mu_k), shapes (N, K) and (N, K, D)."""
    lam = a[:, None, None] ** 2 * gm.evals[None] + s[:, None, None] ** 2  # (N, K, D)
    diff = x[:, None, :] - a[:, None, None] * gm.means[None]  # (N, K, D)
    proj = jnp.einsum("kdj,nkd->nkj", gm.evecs, diff)  # U^T diff
    maha = jnp.sum(proj ** 2 / lam, -1)
    logn = -0.5 * (maha + jnp.sum(jnp.log(lam), -1) + gm.dim * math.log(2 * math.pi))
    cinv_diff = jnp.einsum("kdj,nkj->nkd", gm.evecs, proj / lam)
    return logn, cinv_diff, lam, proj


def log_prob(gm: GaussianMixture, x, process: Process | None = None, t=None) -> jax.Array:
    """log p_t(x) for x (N, D); p_0 when process is None."""
    a, s = _coefs(process, t, x.shape[0])
    logn, *_ = _components(gm, x, a, s)
    return jax.nn.logsumexp(logn + jnp.log(gm.weights), axis=-1)


def responsibilities(gm: GaussianMixture, x, process: Process | None = None, t=None) -> jax.Array:
    """Posterior component probabilities r_k(x) at time t, shape (N, K)."""
    a, s = _coefs(process, t, x.shape[0])
    logn, *_ = _components(gm, x, a, s)
    return jax.nn.softmax(logn + jnp.log(gm.weights), axis=-1)


def score(gm: GaussianMixture, x, process: Process | None = None, t=None) -> jax.Array:
    """grad_x log p_t(x)."""
    a, s = _coefs(process, t, x.shape[0])
    logn, cinv_diff, _, _ = _components(gm, x, a, s)
    r = jax.nn.softmax(logn + jnp.log(gm.weights), axis=-1)
    return -jnp.einsum("nk,nkd->nd", r, cinv_diff)


def eps(gm: GaussianMixture, x, process: Process, t) -> jax.Array:
    """The exact epsilon: E[eps | x_t = x] = -sigma(t) grad log p_t(x)."""
    _, s = _coefs(process, t, x.shape[0])
    return -s[:, None] * score(gm, x, process, t)


def x0_mean(gm: GaussianMixture, x, process: Process, t) -> jax.Array:
    """The exact denoiser E[x_0 | x_t = x]."""
    a, s = _coefs(process, t, x.shape[0])
    logn, cinv_diff, _, _ = _components(gm, x, a, s)
    r = jax.nn.softmax(logn + jnp.log(gm.weights), axis=-1)
    post = gm.means[None] + a[:, None, None] * jnp.einsum("kde,nke->nkd", gm.covs, cinv_diff)
    return jnp.einsum("nk,nkd->nd", r, post)


def eps_fn(gm: GaussianMixture, process: Process, event_shape=None):
    """The exact eps as a library denoiser `eps_fn(x, t, cond)`; x may be (B, D) or (B, *event_shape)."""

    def fn(x, t, cond=None):
        flat = x.reshape(x.shape[0], -1)
        return eps(gm, flat, process, t).reshape(x.shape)

    return fn


def gaussian_flow(gm: GaussianMixture, process: Process, x_s, s, t) -> jax.Array:
    """Exact probability-flow ODE map from time s to time t for a single Gaussian (K = 1)."""
    if gm.num_components != 1:
        raise ValueError("the closed-form flow map exists only for a single Gaussian (K = 1)")
    mu, e, u = gm.means[0], gm.evals[0], gm.evecs[0]
    a_s, s_s = process.alpha(as_time(s)), process.sigma(as_time(s))
    a_t, s_t = process.alpha(as_time(t)), process.sigma(as_time(t))
    ratio = jnp.sqrt((a_t ** 2 * e + s_t ** 2) / (a_s ** 2 * e + s_s ** 2))
    proj = (x_s - a_s * mu) @ u
    return a_t * mu + (proj * ratio) @ u.T


def marginal(gm: GaussianMixture, process: Process, t) -> GaussianMixture:
    """p_t as a mixture (for a scalar t)."""
    t = as_time(t)
    a, s = process.alpha(t), process.sigma(t)
    evals = a ** 2 * gm.evals + s ** 2
    covs = a ** 2 * gm.covs + s ** 2 * jnp.eye(gm.dim)
    return GaussianMixture(gm.weights, a * gm.means, covs, evals, gm.evecs)
