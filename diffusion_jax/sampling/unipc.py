"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor-corrector with B(h) = e^h - 1 ('bh2') or
B(h) = h ('bh1') and data prediction, following wl-zhao/UniPC `multistep_uni_pc_bh_update`.

In lambda = log(alpha / sigma) with h = lambda_k - lambda_{k-1}, r_m = (lambda_{k-1-m} - lambda_{k-1}) / h,
D_m = (x0_{k-1-m} - x0_{k-1}) / r_m and, for data prediction, B = e^{-h} - 1, an update of order p is

    base       x_k' = (sigma_k / sigma_{k-1}) x_{k-1} - alpha_k B x0_{k-1}
    UniP-p     x_k  = x_k' - alpha_k B sum_{m=1}^{p-1} rho^p_m D_m
    UniC-p     x_k^c = x_k' - alpha_k B (sum_{m=1}^{p-1} rho^c_m D_m + rho^c_p (x0(x_k, t_k) - x0_{k-1}))

with rho solving sum_m rho_m r_m^j = b_j (r_p = 1 for the corrector), b_j = (j+1)! phi_{j+2}(-h) / phi_1(-h)
for j < p (p - 1 for the predictor), except the official rho^p = 1/2 for p = 2 and rho^c = 1/2 for p = 1.
The corrector reuses the evaluation x0(x_k, t_k) at the predicted point, which the next step needs
anyway, so NFE = N; it runs on every step but the last (where it would cost an extra call). A
predictor of order p plus the corrector has order of accuracy p + 1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.common import SamplerOutput, track_nonfinite
from diffusion_jax.sampling.dpm_solver import past_lambdas, phi, select_order, step_orders
from diffusion_jax.sampling.ode import call_eps, half_lambda, state_dtype

__all__ = ["unipc"]


def _vandermonde_solve(nodes, b):
    """rho with sum_m rho_m nodes_m^j = b_j for j < p (p = len(nodes) <= 3), per step, in closed form:
    rho_m = sum_j b_j [r^j] L_m(r) with L_m the Lagrange basis polynomial of node m."""
    rhos = []
    for m, r_m in enumerate(nodes):
        poly, den = [1.0], 1.0  # coefficients of prod_{n != m} (r - r_n), lowest degree first
        for n, r_n in enumerate(nodes):
            if n != m:
                poly = [(poly[k - 1] if k > 0 else 0.0) - r_n * (poly[k] if k < len(poly) else 0.0)
                        for k in range(len(poly) + 1)]
                den = den * (r_m - r_n)
        rhos.append(sum(b_j * c for b_j, c in zip(b, poly)) / den)
    return rhos


def _coefficients(process: Process, ts, order: int, lower_order_final: bool, variant: str = "bh2"):
    """Per update k = 1..N: ratio sigma_k/sigma_{k-1}, predictor coefficients P (N, order) on
    [x0_{k-1}, x0_{k-2}, ...] and corrector coefficients C (N, order + 1) on [x0_k, x0_{k-1}, ...]."""
    lam = half_lambda(process, ts)
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    l0, l1, l2 = past_lambdas(lam, 2)
    h = lam[1:] - l0
    rs = [(l1 - l0) / h, (l2 - l0) / h][:order - 1]  # r_m = (lambda_{k-1-m} - lambda_{k-1}) / h < 0
    half = jnp.full_like(h, 0.5)
    # B(h) of the official code with hh = -h: 'bh1' B = hh, 'bh2' B = e^hh - 1; b_j = (j+1)! hh phi_{j+2}(hh) / B.
    big_b = -h if variant == "bh1" else jnp.expm1(-h)
    b = [math.factorial(j + 1) * (-h) * phi(j + 2, -h) / big_b for j in range(order)]
    one = jnp.expm1(-h) / big_b  # the exact base term -alpha (e^-h - 1) x0_{k-1}, in units of -alpha B

    def combine(rho_prev, rho_now=None):
        # x0_{k-1} + sum_m rho_m (x0_{k-1-m} - x0_{k-1}) / r_m [+ rho_now (x0_k - x0_{k-1})] as coefficients
        # on [x0_{k-1}, ..., x0_{k-order}], preceded by the one on x0_k for the corrector.
        on_prev = [one - sum(rho / r for rho, r in zip(rho_prev, rs))] + [rho / r for rho, r in zip(rho_prev, rs)]
        on_prev += [jnp.zeros_like(h)] * (order - len(on_prev))
        if rho_now is None:
            return on_prev
        return [rho_now, on_prev[0] - rho_now] + on_prev[1:]

    pred = [combine([]), combine([half]), combine(_vandermonde_solve(rs, b[:2]))][:order]
    corr = [combine([], half)]
    for p in range(2, order + 1):
        rho = _vandermonde_solve(rs[:p - 1] + [jnp.ones_like(h)], b[:p])
        corr.append(combine(rho[:-1], rho[-1]))
    orders = step_orders(ts.shape[0] - 1, order, lower_order_final)
    scale = -alpha[1:] * big_b  # -alpha_k B(h)
    P = jnp.stack([scale * select_order(orders, [c[j] for c in pred]) for j in range(order)], -1)
    C = jnp.stack([scale * select_order(orders, [c[j] for c in corr]) for j in range(order + 1)], -1)
    return sigma[1:] / sigma[:-1], P, C


def unipc(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, order: int = 2,
          use_corrector: bool = True, lower_order_final: bool = True, variant: str = "bh2") -> SamplerOutput:
    """UniPC-p (data prediction) with predictor order `order` in 1..3, deterministic, NFE = N.

    variant: 'bh2' (B(h) = e^h - 1, the default) or 'bh1' (B(h) = h, recommended by the authors for
    unconditional sampling with very few steps).
    With the corrector (UniC) the accuracy order is order + 1 (UniPC-2 is third order); use_corrector=False
    gives the plain multistep UniP (order 1: DDIM). Warm-up: orders 1, 2, ... while the history fills;
    with lower_order_final and N < 10 the last steps drop to lower order (the rule of the official
    DPM-Solver; the official UniPC applies it at any N, which caps the order at large N).
    """
    del key, noise  # deterministic
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
    x = jnp.asarray(x, state_dtype(x))
    ts = as_time(ts)
    num_steps = ts.shape[0] - 1
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    ratio, P, C = _coefficients(process, ts, order, lower_order_final, variant)
    # Scan step i corrects the update that landed on t_i (k = i; none for i = 0 or without corrector),
    # then predicts the update to t_{i+1} (k = i + 1).
    on = jnp.arange(num_steps) >= 1 if use_corrector else jnp.zeros((num_steps,), bool)
    c_ratio = jnp.where(on, jnp.concatenate([ratio[:1], ratio[:-1]]), 0.0)
    c_coefs = jnp.where(on[:, None], jnp.concatenate([C[:1], C[:-1]]), 0.0)
    dtype = x.dtype

    def step(carry, inp):
        x_prev, x, hist, bad = carry  # corrected x_{i-1}, predicted x_i, (x0_{i-1}, ..., x0_{i-order})
        i, t, a, s, on_i, cr, cc, pr, pc = inp
        x0 = ((x - s * call_eps(eps_fn, x, t, cond)) / a).astype(dtype)
        x_c = cr * x_prev
        for j, m in enumerate((x0,) + hist):
            x_c = x_c + cc[j] * m
        x = jnp.where(on_i, x_c, x)
        hist = (x0,) + hist[:-1]
        x_next = pr * x
        for j in range(order):
            x_next = x_next + pc[j] * hist[j]
        x_next = x_next.astype(dtype)
        return (x, x_next, hist, track_nonfinite(bad, i, x_next)), None

    hist = tuple(jnp.zeros_like(x) for _ in range(order))
    xs = (jnp.arange(num_steps), ts[:-1], alpha[:-1], sigma[:-1], on, c_ratio.astype(dtype),
          c_coefs.astype(dtype), ratio.astype(dtype), P.astype(dtype))
    (_, x, _, bad), _ = jax.lax.scan(step, (x, x, hist, jnp.int32(-1)), xs)
    return SamplerOutput(x, num_steps, bad)
