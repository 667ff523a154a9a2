"""Distances between sample sets and mixture-fit statistics, for checking samplers against truth."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.reference.mixtures import GaussianMixture, responsibilities


def sliced_wasserstein(x, y, key, num_projections: int = 256) -> jax.Array:
    """Sliced 2-Wasserstein distance sqrt(E_theta W_2^2(theta.x, theta.y)) with random unit directions.

    x, y: (N, D) with the same N (sorted 1-D projections are matched one to one).
    """
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {x.shape} and {y.shape}")
    theta = jax.random.normal(key, (x.shape[-1], num_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def energy_distance(x, y) -> jax.Array:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (zero iff the distributions agree)."""

    def mean_dist(a, b):
        d2 = jnp.sum(a ** 2, 1)[:, None] + jnp.sum(b ** 2, 1)[None] - 2 * a @ b.T
        return jnp.mean(jnp.sqrt(jnp.maximum(d2, 1e-12)))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def mixture_fit(gm: GaussianMixture, x) -> dict[str, jax.Array]:
    """Assigns samples to components by posterior responsibility (hard), and returns the empirical
    component weights (K,), means (K, D) and covariances (K, D, D) next to the truth."""
    r = responsibilities(gm, x)
    hard = jax.nn.one_hot(jnp.argmax(r, -1), gm.num_components)
    n_k = jnp.sum(hard, 0)
    w = n_k / x.shape[0]
    means = (hard.T @ x) / jnp.maximum(n_k, 1)[:, None]
    diff = x[:, None, :] - means[None]
    covs = jnp.einsum("nk,nkd,nke->kde", hard, diff, diff) / jnp.maximum(n_k - 1, 1)[:, None, None]
    return {
        "weights": w,
        "means": means,
        "covs": covs,
        "weight_error": jnp.max(jnp.abs(w - gm.weights)),
        "mean_error": jnp.max(jnp.linalg.norm(means - gm.means, axis=-1)),
        "cov_error": jnp.max(jnp.linalg.norm(covs - gm.covs, axis=(-2, -1))
                             / jnp.linalg.norm(gm.covs, axis=(-2, -1))),
    }
