"""Solvers for the probability-flow ODE (Song et al. 2021)

    dx/dt = f(t) x - 1/2 g(t)^2 score(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t).

With the scaled state x_hat = x / alpha and EDM's noise level sigma_hat = sigma / alpha = exp(-lambda)
(lambda = log(alpha / sigma), half the library's log-SNR) the same ODE reads, for every process,

    dx_hat / dsigma_hat = eps(x, t)                 (Karras et al. 2022, eq. 4)
    dx_hat / dlambda    = x0(x, t) - x_hat = -sigma_hat eps(x, t)      (data-prediction form)

`euler` and `midpoint` step the ODE in t (on the linear flow path its drift is the flow velocity
u = eps - x0, so they are the flow-matching Euler / midpoint samplers), `heun` the first form (EDM's
Algorithm 2) and `adaptive` the second with diffrax. `reference_solution` is the high-accuracy solve that every deterministic sampler converges to.
"""
from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.sampling.common import SamplerOutput, batch_time, step_noise, track_nonfinite

__all__ = ["euler", "midpoint", "heun", "adaptive", "reference_solution", "ADAPTIVE_SOLVERS"]


# ---------------------------------------------------------------------------------------------
# helpers shared by the ODE solvers (also imported by dpm_solver.py and unipc.py)
def state_dtype(x) -> jnp.dtype:
    """The solver-state dtype: float32 (float64 if x already is), never the network's bfloat16. The
    samplers keep their `lax.scan` carry in this dtype: under x64 the schedule is float64, and a
    float32 state stays float32 (the step is computed in float64 and rounded back)."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def call_eps(eps_fn, x, t, cond):
    """eps_fn(x, t, cond) at a scalar time, t broadcast to (B,), its output cast to x's dtype."""
    return eps_fn(x, batch_time(as_time(t), x), cond).astype(x.dtype)


def half_lambda(process: Process, t):
    """lambda(t) = log(alpha / sigma) = log_snr(t) / 2: the variable of DPM-Solver and UniPC."""
    return 0.5 * process.log_snr(as_time(t))


def pf_drift(eps_fn, process: Process, x, t, cond):
    """The probability-flow ODE drift f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t) at a scalar time t (the
    flow velocity alpha' x0_hat + sigma' eps_hat; eps_hat - x0_hat on the linear path)."""
    return process.f(t) * x + (process.g2(t) / (2.0 * process.sigma(t))) * call_eps(eps_fn, x, t, cond)


# ---------------------------------------------------------------------------------------------
def euler(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None) -> SamplerOutput:
    """Explicit Euler on the probability-flow ODE in t (first order, NFE = N):

        x_{i+1} = x_i + (t_{i+1} - t_i) [f(t_i) x_i + g(t_i)^2 / (2 sigma(t_i)) eps(x_i, t_i)].
    """
    del key, noise  # deterministic
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    ts = as_time(ts)

    def step(carry, i):
        x, bad = carry
        t, t_next = ts[i], ts[i + 1]
        x = (x + (t_next - t) * pf_drift(eps_fn, process, x, t, cond)).astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    num_steps = ts.shape[0] - 1
    (x, bad), _ = jax.lax.scan(step, (x, jnp.int32(-1)), jnp.arange(num_steps))
    return SamplerOutput(x, num_steps, bad)


def midpoint(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None) -> SamplerOutput:
    """Explicit midpoint (2nd-order Runge-Kutta) on the probability-flow ODE in t (NFE = 2N), with
    v(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t) and h = t_{i+1} - t_i:

        x_mid = x_i + (h/2) v(x_i, t_i),        x_{i+1} = x_i + h v(x_mid, t_i + h/2)

    (the 'midpoint' ODE method of the flow-matching libraries, on the linear path v = eps - x0).
    """
    del key, noise  # deterministic
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    ts = as_time(ts)

    def step(carry, i):
        x, bad = carry
        t, h = ts[i], ts[i + 1] - ts[i]
        x_mid = (x + 0.5 * h * pf_drift(eps_fn, process, x, t, cond)).astype(dtype)
        x = (x + h * pf_drift(eps_fn, process, x_mid, t + 0.5 * h, cond)).astype(dtype)
        return (x, track_nonfinite(bad, i, x)), None

    num_steps = ts.shape[0] - 1
    (x, bad), _ = jax.lax.scan(step, (x, jnp.int32(-1)), jnp.arange(num_steps))
    return SamplerOutput(x, 2 * num_steps, bad)


def heun(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, last_step_euler: bool = False,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
         s_noise: float = 1.0) -> SamplerOutput:
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2) for any process.

    In x_hat = x / alpha and sigma_hat = sigma / alpha (EDM's variables; for VP exactly EDM's VP
    preconditioning), with d(x, t) = eps(x, t) = dx_hat / dsigma_hat:

        churn     gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_hat_i <= s_tmax else 0
                  sigma_up = sigma_hat_i (1 + gamma),   x_hat += sqrt(sigma_up^2 - sigma_hat_i^2) s_noise z
        Euler     x_hat' = x_hat + (sigma_hat_{i+1} - sigma_up) d(x, t_up)
        Heun      x_hat_{i+1} = x_hat + (sigma_hat_{i+1} - sigma_up) (d(x, t_up) + d(x', t_{i+1})) / 2

    Every step is a Heun step (NFE = 2N): EDM takes an Euler last step only when sigma_{N} = 0, and
    our grids end at t_min > 0; `last_step_euler=True` does so anyway (NFE = 2N - 1). s_churn > 0 makes
    the sampler stochastic (needs key= or noise= of shape (N, *x.shape)); sigma_up is capped at the
    process's sigma_hat(t_max), where the denoiser is defined. s_churn must be a Python number.
    """
    dtype = state_dtype(x)
    x = jnp.asarray(x, dtype)
    ts = as_time(ts)
    num_steps = ts.shape[0] - 1
    stochastic = s_churn > 0
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0) if stochastic else 0.0
    sig_cap = process.edm_sigma(as_time(process.t_max))

    def step(x, bad, i, second_order: bool):
        t, t_next = ts[i], ts[i + 1]
        sig, sig_next = process.edm_sigma(t), process.edm_sigma(t_next)
        x_hat = x / process.alpha(t)
        if stochastic:
            gamma = jnp.where((sig >= s_tmin) & (sig <= s_tmax), gamma_max, 0.0)
            sig_up = jnp.minimum(sig * (1.0 + gamma), jnp.maximum(sig_cap, sig))
            t = jnp.where(sig_up > sig, process.t_from_edm_sigma(sig_up), t)
            z = step_noise(key, noise, i, x.shape, x.dtype)
            x_hat = x_hat + jnp.sqrt(jnp.maximum(sig_up ** 2 - sig ** 2, 0.0)) * s_noise * z
            sig = sig_up
        d = call_eps(eps_fn, process.alpha(t) * x_hat, t, cond)
        x_hat_next = x_hat + (sig_next - sig) * d
        if second_order:
            a_next = process.alpha(t_next)
            d_next = call_eps(eps_fn, a_next * x_hat_next, t_next, cond)
            x_hat_next = x_hat + (sig_next - sig) * (0.5 * (d + d_next))
        x = (process.alpha(t_next) * x_hat_next).astype(dtype)
        return x, track_nonfinite(bad, i, x)

    def body(carry, i):
        return step(*carry, i, second_order=True), None

    num_heun = num_steps - 1 if last_step_euler else num_steps
    x, bad = jax.lax.scan(body, (x, jnp.int32(-1)), jnp.arange(num_heun))[0]
    if last_step_euler:
        x, bad = step(x, bad, num_steps - 1, second_order=False)
    return SamplerOutput(x, 2 * num_heun + (num_steps - num_heun), bad)


# ---------------------------------------------------------------------------------------------
_DT0 = 0.01  # first step in lambda; the PID controller grows it by up to 10x a step
ADAPTIVE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}


def _solve_in_lambda(eps_fn, process: Process, x, t_start, t_end, cond, solver: str, rtol: float, atol: float,
                     max_steps: int):
    """Integrates dx_hat/dlambda = -sigma_hat eps(alpha x_hat, t(lambda)) from t_start to t_end with
    diffrax; returns (x at t_end, number of eps_fn evaluations)."""
    if solver not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown adaptive solver {solver!r}; expected one of {sorted(ADAPTIVE_SOLVERS)}")
    x = jnp.asarray(x, state_dtype(x))
    t_start, t_end = as_time(t_start), as_time(t_end)

    def vector_field(lam, x_hat, args):
        t = process.t_from_log_snr(2.0 * lam)
        return -jnp.exp(-lam) * call_eps(eps_fn, process.alpha(t) * x_hat, t, cond)

    lam0, lam1 = half_lambda(process, t_start), half_lambda(process, t_end)
    method = ADAPTIVE_SOLVERS[solver]()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), method, t0=lam0.astype(x.dtype), t1=lam1.astype(x.dtype),
        dt0=jnp.asarray(_DT0, x.dtype), y0=x / process.alpha(t_start), saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
    )
    x_end = (process.alpha(t_end) * sol.ys[-1]).astype(x.dtype)
    # Evaluations of the vector field: 1 for the first stage of the first step, then num_stages - 1 per
    # step attempt, accepted or rejected (FSAL: the last stage of an accepted step is the first stage
    # of the next; a rejected attempt reuses the first stage it started from). dt0 is given, so no
    # evaluations go into choosing it. Exact unless the very first attempt (dt0 = 0.01 in lambda) is
    # rejected, which would re-evaluate the first stage once more; the tests count calls at run time.
    tableau = method.tableau
    per_step = tableau.num_stages - 1 if tableau.fsal else tableau.num_stages
    nfe = int(tableau.fsal) + per_step * sol.stats["num_steps"]
    return x_end, nfe


def adaptive(eps_fn, process: Process, x, ts, *, cond=None, key=None, noise=None, solver: str = "tsit5",
             rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096) -> SamplerOutput:
    """Adaptive-step solve of the probability-flow ODE from ts[0] to ts[-1] (ts in between is unused).

    Integrates in lambda = log(alpha / sigma) the data-prediction form

        dx_hat / dlambda = x0(x, t) - x_hat = -sigma_hat eps(x, t),    x_hat = x / alpha, sigma_hat = e^{-lambda}

    with diffrax (`solver` in 'tsit5', 'dopri5', 'dopri8'; PIDController(rtol, atol)). In lambda the ODE
    is not stiff: for a Gaussian its Jacobian is -sigma_hat^2 / (e + sigma_hat^2) in (-1, 0) per
    eigenvalue e, where in t it grows like 1/sigma^2 as t -> 0. nfe is an int array: the exact count
    of eps_fn evaluations derived from diffrax's stats (see `_solve_in_lambda`). diffrax raises if
    max_steps is exceeded.
    """
    del key, noise  # deterministic
    ts = as_time(ts)
    x_end, nfe = _solve_in_lambda(eps_fn, process, x, ts[0], ts[-1], cond, solver, rtol, atol, max_steps)
    return SamplerOutput(x_end, nfe, track_nonfinite(jnp.int32(-1), 0, x_end))


def reference_solution(eps_fn, process: Process, x, t_start, t_end, cond=None, *, rtol: float | None = None,
                       atol: float | None = None, max_steps: int = 16384):
    """The ground-truth probability-flow ODE solution from x at t_start to t_end, for tests and benchmarks.

    diffrax Dopri8 in lambda (as `adaptive`), tolerances rtol = atol = 1e-6 in float32 (1e-10 when x
    is float64 under x64). Every deterministic sampler converges to this from the same x_T. Returns x
    at t_end (jit it for repeated use).
    """
    dtype = state_dtype(x)
    tol = 1e-10 if dtype == jnp.float64 else 1e-6
    rtol = tol if rtol is None else rtol
    atol = tol if atol is None else atol
    return _solve_in_lambda(eps_fn, process, x, t_start, t_end, cond, "dopri8", rtol, atol, max_steps)[0]
