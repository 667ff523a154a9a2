"""Closed forms for Gaussian-mixture data under critically-damped Langevin diffusion (`processes.CLD`).

With data x0 ~ sum_k w_k N(mu_k, S_k) in R^D and v0 ~ N(0, gamma M I) independent, each coordinate pair
evolves linearly (`CLD.transition`: u_t = Phi u_0 + noise of covariance Q), so the phase-space marginal is
a mixture of 2D-dimensional Gaussians,

    p_t(x, v) = sum_k w_k N((x, v); (Phi_xx mu_k, Phi_vx mu_k), C_k(t)),
    C_k(t) = (Phi (x) I) blockdiag(S_k, gamma M I) (Phi (x) I)^T + Q (x) I.

In the eigenbasis of S_k = U_k diag(e_k) U_k^T every block of C_k is U_k diag(.) U_k^T, so C_k splits into D
independent 2x2 covariances Sigma_kj = Phi diag(e_kj, gamma M) Phi^T + Q (`CLD.propagate`), and with
(p_x, p_v) = U_k^T (x - Phi_xx mu_k, v - Phi_vx mu_k) and L_kj the Cholesky factor of Sigma_kj,
eps = L_kj^{-1} (p_x, p_v):

    log N_k = -sum_j [ |eps_j|^2 / 2 + log l_xx + log l_vv + log 2 pi ],
    grad_(x, v) log N_k = -U_k L^{-T} eps   (per eigen-direction: (eps_x/l_xx - l_vx eps_v/(l_xx l_vv), eps_v/l_vv)),

and the mixture score is the responsibility-weighted sum. At t = 0, p_0(x, v) = p_data(x) N(v; 0, gamma M I).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import as_time
from diffusion_jax.processes.cld import CLD
from diffusion_jax.reference.mixtures import GaussianMixture
from diffusion_jax.reference.mixtures import sample as sample_data


def _components(gm: GaussianMixture, process: CLD, x, v, t):
    """Per-component log N_k (N, K) and grad_x, grad_v log N_k (N, K, D) at times t (N,)."""
    t = jnp.broadcast_to(as_time(t), (x.shape[0],))
    tr = process.transition(process.beta_int(t))
    tr_e = type(tr)(*(q[:, None, None] for q in tr))          # (N, 1, 1) against (K, D)
    cov = process.propagate(tr_e, gm.evals[None])              # (N, K, D)
    mx = tr_e.pxx[..., 0:1] * gm.means[None]                   # (N, K, D) in the data basis
    mv = tr_e.pvx[..., 0:1] * gm.means[None]
    px = jnp.einsum("kdj,nkd->nkj", gm.evecs, x[:, None, :] - mx)
    pv = jnp.einsum("kdj,nkd->nkj", gm.evecs, v[:, None, :] - mv)
    ex = px / cov.lxx
    ev = (pv - cov.lvx * ex) / cov.lvv
    logn = -jnp.sum(0.5 * (ex ** 2 + ev ** 2) + jnp.log(cov.lxx) + jnp.log(cov.lvv) + math.log(2 * math.pi), -1)
    gv = -ev / cov.lvv
    gx = -(ex - cov.lvx * ev / cov.lvv) / cov.lxx
    back = lambda g: jnp.einsum("kdj,nkj->nkd", gm.evecs, g)  # noqa: E731
    return logn, back(gx), back(gv)


def log_prob(gm: GaussianMixture, process: CLD, x, v, t) -> jax.Array:
    """log p_t(x, v) for x, v (N, D); t a scalar or (N,)."""
    logn, _, _ = _components(gm, process, x, v, t)
    return jax.nn.logsumexp(logn + jnp.log(gm.weights), axis=-1)


def score(gm: GaussianMixture, process: CLD, x, v, t) -> tuple[jax.Array, jax.Array]:
    """(grad_x log p_t, grad_v log p_t) at (x, v) (N, D)."""
    logn, gx, gv = _components(gm, process, x, v, t)
    r = jax.nn.softmax(logn + jnp.log(gm.weights), axis=-1)
    return jnp.einsum("nk,nkd->nd", r, gx), jnp.einsum("nk,nkd->nd", r, gv)


def cld_mixture_score(gm: GaussianMixture, process: CLD, x, v, t) -> jax.Array:
    """The velocity score grad_v log p_t(x, v): all that CLD's reverse SDE and PF-ODE need."""
    return score(gm, process, x, v, t)[1]


def score_v_fn(gm: GaussianMixture, process: CLD):
    """The exact velocity score as a sampler's `score_v_fn(x, v, t)`; x, v may be (B, D) or (B, *event)."""

    def fn(x, v, t):
        b = x.shape[0]
        return cld_mixture_score(gm, process, x.reshape(b, -1), v.reshape(b, -1), t).reshape(x.shape)

    return fn


def sample(gm: GaussianMixture, process: CLD, key, n: int, t) -> tuple[jax.Array, jax.Array]:
    """n draws (x_t, v_t) of the phase-space marginal at a scalar time t: x0 from the mixture,
    v0 ~ N(0, gamma M I), then the forward kernel given (x0, v0)."""
    k0, kv, kx, ke = jax.random.split(key, 4)
    x0, _ = sample_data(gm, k0, n)
    v0 = math.sqrt(process.var0v) * jax.random.normal(kv, x0.shape)
    tt = jnp.full((n,), as_time(t))
    return process.perturb(x0, tt, jax.random.normal(kx, x0.shape), jax.random.normal(ke, x0.shape),
                           v0=v0, var0v=0.0)


__all__ = ["log_prob", "score", "cld_mixture_score", "score_v_fn", "sample"]
