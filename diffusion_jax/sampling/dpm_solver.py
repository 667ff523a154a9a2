"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): multistep exponential integrators of the
probability-flow ODE with DATA prediction x0 = (x - sigma eps) / alpha.

In lambda = log(alpha / sigma) (HALF the library's log-SNR) the ODE's linear part is solved exactly:

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,

and x0 is extrapolated from the last few evaluations. With h = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i
and x0_i the data prediction at step i,

    2M   x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i,
         D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}                               (first step: D_0 = x0_0)
    3M   the quadratic extrapolation of x0 through x0_i, x0_{i-1}, x0_{i-2} (see `dpmpp_3m`)

Every update is linear in the state and the stored data predictions with coefficients that depend
only on the grid, so they are computed for all steps at once (warm-up and lower-order final steps
included) and the scan body is one denoiser call and one linear combination: NFE = N.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.common import SamplerOutput, step_noise, track_nonfinite
from diffusion_jax.sampling.ode import call_eps, half_lambda, state_dtype

__all__ = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "phi", "step_orders"]


def phi(k: int, z):
    """phi_k(z) = sum_{n>=0} z^n / (n + k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), accurate
    to float32 rounding for every z: a 12-term Taylor series for |z| < 1 (where the recursion cancels
    catastrophically), the recursion elsewhere."""
    z = jnp.asarray(z)
    terms = 12
    series = jnp.full_like(z, 1.0 / math.factorial(terms + k))
    for n in range(terms - 1, -1, -1):
        series = series * z + 1.0 / math.factorial(n + k)
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, 1.0, z)
    rec = jnp.exp(zs)
    for j in range(k):
        rec = (rec - 1.0 / math.factorial(j)) / zs
    return jnp.where(small, series, rec)


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
    """The order of each of the N multistep updates (static): 1, 2, ... up to `order` while the history
    fills (warm-up), and with lower_order_final and N < 10 (the official DPM-Solver rule) decreasing
    again to 1 on the last steps."""
    k = np.arange(1, num_steps + 1)
    orders = np.minimum(order, k)
    if lower_order_final and num_steps < 10:
        orders = np.minimum(orders, num_steps + 1 - k)
    return orders


def past_lambdas(lam, depth: int):
    """For the N updates k = 1..N: [lambda_{k-1}, lambda_{k-2}, ..., lambda_{k-1-depth}], each of shape (N,).
    Values before t_0 do not exist; they are extrapolated with the first step so that the coefficients
    of the unused higher orders stay finite (they are then discarded)."""
    n = lam.shape[0] - 1
    pad = lam[0] - (lam[1] - lam[0]) * jnp.arange(depth, 0, -1, dtype=lam.dtype)
    full = jnp.concatenate([pad, lam])
    return [full[depth - j: depth - j + n] for j in range(depth + 1)]


def select_order(orders: np.ndarray, by_order):
    """Entry k of by_order[orders[k] - 1] (each of shape (N,)), for the static per-step orders."""
    out = by_order[0]
    for p, c in enumerate(by_order[1:], start=2):
        out = jnp.where(jnp.asarray(orders == p), c, out)
    return out


def _multistep_coefficients(process: Process, ts, order: int, lower_order_final: bool, half_d2: bool = False):
    """(ratio, C) with x_k = ratio_k x_{k-1} + sum_j C[k-1, j] x0_{k-1-j}, ratio_k = sigma_k / sigma_{k-1}:
    DPM-Solver++ multistep ('dpmsolver' solver type) of order min(order, k, ...) at update k = 1..N."""
    lam = half_lambda(process, ts)
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    l0, l1, l2 = past_lambdas(lam, 2)
    h = lam[1:] - l0
    zero = jnp.zeros_like(h)
    phi_1 = jnp.expm1(-h)
    rows = [[-phi_1, zero, zero]]  # per order, the coefficients on [x0_{k-1}, x0_{k-2}, x0_{k-3}]
    if order >= 2:
        r0 = (l0 - l1) / h
        rows.append([-phi_1 * (1.0 + 0.5 / r0), phi_1 * 0.5 / r0, zero])
    if order >= 3:
        # The official phi_2 = phi_1 / h + 1 and phi_3 = phi_2 / h - 1/2, written stably.
        phi_2, phi_3 = h * phi(2, -h), -h * phi(3, -h)
        r1 = (l1 - l2) / h
        d1_0 = [1.0 / r0, -1.0 / r0, zero]  # D1_0 = (x0_{k-1} - x0_{k-2}) / r0 as coefficients
        d1_1 = [zero, 1.0 / r1, -1.0 / r1]  # D1_1 = (x0_{k-2} - x0_{k-3}) / r1
        w = r0 / (r0 + r1)
        # D1 = D1_0 + w (D1_0 - D1_1) ~ h x0';  D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, doubled to
        # ~ h^2 x0'' (the weight that makes the update exact for quadratic x0) unless half_d2.
        c2 = (1.0 if half_d2 else 2.0) / (r0 + r1)
        rows.append([(-phi_1 if j == 0 else zero) + phi_2 * (a + w * (a - b)) - phi_3 * c2 * (a - b)
                     for j, (a, b) in enumerate(zip(d1_0, d1_1))])
    orders = step_orders(ts.shape[0] - 1, order, lower_order_final)
    coefs = jnp.stack([alpha[1:] * select_order(orders, [row[j] for row in rows]) for j in range(order)], -1)
    return sigma[1:] / sigma[:-1], coefs


def _linear_multistep(eps_fn, process: Process, x, ts, cond, ratio, coefs, noise_std=None, key=None, noise=None):
    """The shared scan: at step i, x0_i = x0(x_i, t_i) (one eps_fn call), then

        x_{i+1} = ratio_i x_i + sum_j coefs[i, j] x0_{i-j} (+ noise_std_i z_i).
    """
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    depth = coefs.shape[1]

    dtype = x.dtype

    def step(carry, inp):
        x, hist, bad = carry
        i, t, a, s, ratio_i, c = inp
        x0 = ((x - s * call_eps(eps_fn, x, t, cond)) / a).astype(dtype)
        hist = (x0,) + hist[:-1]
        x_next = ratio_i * x
        for j in range(depth):
            x_next = x_next + c[j] * hist[j]
        if noise_std is not None:
            x_next = x_next + noise_std[i] * step_noise(key, noise, i, x.shape, dtype)
        x_next = x_next.astype(dtype)
        return (x_next, hist, track_nonfinite(bad, i, x_next)), None

    num_steps = ts.shape[0] - 1
    hist = tuple(jnp.zeros_like(x) for _ in range(depth))
    xs = (jnp.arange(num_steps), ts[:-1], alpha[:-1], sigma[:-1], ratio.astype(x.dtype), coefs.astype(x.dtype))
    (x, _, bad), _ = jax.lax.scan(step, (x, hist, jnp.int32(-1)), xs)
    return SamplerOutput(x, num_steps, bad)


def _multistep(eps_fn, process, x, ts, cond, order, lower_order_final, half_d2=False):
    x = jnp.asarray(x, state_dtype(x))
    ts = as_time(ts)
    ratio, coefs = _multistep_coefficients(process, ts, order, lower_order_final, half_d2)
    return _linear_multistep(eps_fn, process, x, ts, cond, ratio, coefs)


def dpmpp_2m(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None,
             lower_order_final: bool = True) -> SamplerOutput:
    """DPM-Solver++(2M), deterministic, NFE = N (second order):

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) [(1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}],

    h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1}/h_i, lambda = log(alpha/sigma). The first step is first
    order (DDIM); with lower_order_final and N < 10 so is the last (the official `lower_order_final`).
    """
    del key, noise  # deterministic
    return _multistep(eps_fn, process, x, ts, cond, 2, lower_order_final)


def dpmpp_3m(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None,
             lower_order_final: bool = True, half_d2: bool = False) -> SamplerOutput:
    """DPM-Solver++(3M), deterministic, NFE = N (third order). With r0 = h_{i-1}/h, r1 = h_{i-2}/h,

        D1_0 = (x0_i - x0_{i-1}) / r0,  D1_1 = (x0_{i-1} - x0_{i-2}) / r1,
        D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) ~ h x0',   D2 = 2 (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'',
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (phi_1 x0_i - phi_2 D1 + phi_3 D2),
        phi_1 = e^{-h} - 1,  phi_2 = phi_1/h + 1,  phi_3 = phi_2/h - 1/2,

    i.e. x0(lambda) extrapolated by the quadratic through the last three predictions and integrated
    exactly (alpha_{i+1} h^2 (-phi_3) is the weight of x0''). The official `multistep_dpm_solver_third_update`
    (and diffusers, k-diffusion) uses D2 = (D1_0 - D1_1) / (r0 + r1), half the Taylor weight, which
    leaves the update exact only for linear x0 and the method second order; half_d2=True reproduces it.
    Warm-up with a first- then a second-order (2M) step; with lower_order_final and N < 10 the last two
    steps are second and first order.
    """
    del key, noise  # deterministic
    return _multistep(eps_fn, process, x, ts, cond, 3, lower_order_final, half_d2)


def dpmpp_2m_sde(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, eta: float = 1.0,
                 s_noise: float = 1.0, solver_type: str = "midpoint") -> SamplerOutput:
    """DPM-Solver++(2M) SDE (k-diffusion `sample_dpmpp_2m_sde`), stochastic, NFE = N:

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-(1+eta) h}) D_i
                  + sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z_i,

    D_i as in 2M for solver_type='midpoint'; 'heun' replaces alpha_{i+1} (1 - e^{-u}) (x0_i - x0_{i-1}) / (2r)
    by alpha_{i+1} (1 - (1 - e^{-u}) / u) (x0_i - x0_{i-1}) / r, u = (1 + eta) h. The first step is first
    order. eta = 1 is the SDE solver of Lu et al.; eta = 0 gives deterministic DPM-Solver++(2M) (without
    lower-order final steps). Pre-drawn noise has shape (N, *x.shape). eta must be a Python number.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    x = jnp.asarray(x, state_dtype(x))
    ts = as_time(ts)
    lam = half_lambda(process, ts)
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    l0, l1 = past_lambdas(lam, 1)
    h = lam[1:] - l0
    r = (l0 - l1) / h
    u = (1.0 + eta) * h
    phi_u = -jnp.expm1(-u)  # 1 - e^{-(1 + eta) h}
    a_next = alpha[1:]
    if solver_type == "midpoint":
        corr = a_next * phi_u * 0.5 / r
    else:  # 1 - (1 - e^{-u})/u = u phi_2(-u)
        corr = a_next * u * phi(2, -u) / r
    corr = corr.at[0].set(0.0)  # first step: first order
    coefs = jnp.stack([a_next * phi_u + corr, -corr], -1)
    ratio = sigma[1:] / sigma[:-1] * jnp.exp(-eta * h)
    noise_std = None
    if eta != 0:
        noise_std = (sigma[1:] * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) * s_noise).astype(x.dtype)
    return _linear_multistep(eps_fn, process, x, ts, cond, ratio, coefs, noise_std, key, noise)
