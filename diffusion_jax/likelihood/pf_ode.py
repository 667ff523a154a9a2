"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021; FFJORD, Grathwohl et al. 2019).

Every process here has the probability-flow ODE

    dx/dt = v(x, t) = f(t) x - g(t)^2/2 grad log p_t(x) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t),

a deterministic flow carrying p_{t_min} to p_{t_max}. Along its trajectories the continuity equation
gives d log p_t(x_t) / dt = -div v(x_t, t), so with x_{t_min} = x and z = x_{t_max}

    log p_{t_min}(x) = log p_{t_max}(z) + int_{t_min}^{t_max} div v(x_t, t) dt.

We integrate the augmented state [x, delta] with d delta/dt = div v from t_min (data) up to t_max
(noise), on device, with diffrax (Tsit5 or Dopri5 under a PID step-size controller) or with a
fixed-step Heun/RK4 `lax.scan`, and add the prior log-density of z.

Integration variable. Since g^2 = d sigma^2/dt - 2 f sigma^2, the log-SNR obeys d lambda/dt = -g^2/sigma^2,
so in s = -lambda (increasing with t) the same ODE reads

    dx/ds = (sigma^2/g^2) v = (f sigma^2/g^2) x + (sigma/2) eps,     d delta/ds = (sigma^2/g^2) div v,

which is smooth for every process (for VP, f sigma^2/g^2 = -sigma^2/2 with sigma^2 = sigmoid(-lambda)),
even the discrete DDPM schedule whose f(t) jumps at each of its 1000 knots, and spreads the steps
evenly over noise levels (EDM's t in [0.002, 80] is lambda in [-8.8, 12.4]). This is the default
(`time_variable='log_snr'`); `time_variable='t'` integrates dx/dt = v literally, as score_sde does.

Divergence of v at x (B, ...), with J = dv/dx the per-example Jacobian:

    'exact'        sum_i e_i^T J e_i: one Jacobian-vector product per basis vector (D of them, chunked
                   with `lax.map`): for small D.
    'hutchinson'   e^T J e with E[e e^T] = I: Rademacher (+-1) or Gaussian probes, one jvp per probe.
                   The probes are drawn once and held fixed along the whole trajectory (as FFJORD and
                   score_sde do), so the integral is an unbiased estimate of the exact one.

With `num_probes` = P > 1 the trajectory of x is solved once and P separate integrals of e_p^T J e_p
are carried alongside it (x does not depend on the probes), giving P independent, unbiased estimates of
log p per example: `LikelihoodOutput.delta_logp_probes` (P, B), their mean in `logp`, and the standard
error of that mean in `logp_stderr`.

Cost: `nfe` counts evaluations of the vector field; each is one forward pass of `eps_fn`
(via `jax.linearize`) plus P jvps through it (D jvps for 'exact'). An adaptive FSAL Runge-Kutta solve
costs 1 (the first stage, evaluated before the solve) + 6 per attempted step (accepted or rejected; the
first step is (s1 - s0)/64, then PID-controlled); Heun 2 per step; RK4 4 per step.
The step-size controller measures the error over the whole batch: the batch shares its steps.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import Process, as_time, bcast

Array = jax.Array
EpsFn = Callable[[Any, Any, Any], Any]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5", "heun", "rk4")
TIME_VARIABLES = ("log_snr", "t")
_ADAPTIVE = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
_FIXED_EVALS = {"heun": 2, "rk4": 4}


class LikelihoodOutput(NamedTuple):
    """logp (B,): log p_{t_min}(x) = prior_logp + delta_logp (the mean over probes for Hutchinson);
    prior_logp (B,): log p_T(z); delta_logp (B,): int div v dt; z: x at t_max, shaped like x;
    nfe: vector-field evaluations (int array for adaptive solvers, Python int for fixed steps);
    delta_logp_probes (P, B): one integral per probe set (P = 1 for 'exact');
    logp_stderr (B,): standard error of logp over the P probe sets (0 for 'exact', NaN if P = 1)."""

    logp: Array
    prior_logp: Array
    delta_logp: Array
    z: Array
    nfe: Any
    delta_logp_probes: Array
    logp_stderr: Array


def _check(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; expected one of {valid}")


# --- the velocity and its divergence ------------------------------------------------------------
def pf_ode_velocity(eps_fn: EpsFn, process: Process, x: Array, t, cond=None) -> Array:
    """v(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t), float32 whatever eps_fn's dtype.

    t: a scalar or per-example (B,) time."""
    t = as_time(t)
    tb = jnp.broadcast_to(t, (x.shape[0],))
    eps = eps_fn(x, tb, cond).astype(x.dtype)
    return bcast(process.f(t), x) * x + bcast(process.g2(t) / (2.0 * process.sigma(t)), x) * eps


def draw_probes(key, shape, num_probes: int = 1, probe: str = "rademacher", dtype=jnp.float32) -> Array:
    """P Hutchinson probes (P, *shape) with E[e e^T] = I: Rademacher +-1 or standard Gaussian."""
    _check("probe", probe, PROBES)
    shape = (int(num_probes),) + tuple(shape)
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    return jax.random.normal(key, shape, dtype)


def hutchinson_divergence(fn: Callable[[Array], Array], x: Array, probes: Array) -> tuple[Array, Array]:
    """(fn(x), e_p^T J e_p per example (P, B)) for a batched map fn whose examples do not interact.

    One forward pass (`jax.linearize`) and one jvp per probe."""
    y, jvp = jax.linearize(fn, x)
    jp = jax.vmap(jvp)(probes)
    axes = tuple(range(2, probes.ndim))
    return y, jnp.sum(probes * jp, axis=axes)


def exact_divergence(fn: Callable[[Array], Array], x: Array, chunk_size: int = 64) -> tuple[Array, Array]:
    """(fn(x), tr(J) per example (B,)) from D jvps along the basis vectors e_i (batched over all
    examples at once, `chunk_size` basis vectors at a time). For small D only."""
    y, jvp = jax.linearize(fn, x)
    b = x.shape[0]
    d = int(np.prod(x.shape[1:]))

    def diag_entry(i):
        e = jnp.broadcast_to(jax.nn.one_hot(i, d, dtype=x.dtype), (b, d)).reshape(x.shape)
        return jvp(e).reshape(b, d)[:, i]

    diag = jax.lax.map(diag_entry, jnp.arange(d), batch_size=min(d, max(1, int(chunk_size))))
    return y, jnp.sum(diag, axis=0)


# --- the solve -----------------------------------------------------------------------------------
def _to_time(process, time_variable, s, t_min, t_max):
    """(t, dt/ds) at the integration variable s: s = t, or s = -lambda (dt/ds = sigma^2 / g^2)."""
    if time_variable == "t":
        return s, jnp.ones_like(s)
    t = jnp.clip(process.t_from_log_snr(-s), t_min, t_max)
    return t, process.sigma(t) ** 2 / process.g2(t)


def _augmented_rhs(eps_fn, process, divergence, time_variable, t_min, t_max, chunk_size):
    """d/ds [x, delta] = dt/ds [v, div v]; delta has shape (P, B)."""

    def rhs(s, state, args):
        x, _ = state
        cond, probes = args
        t, dt_ds = _to_time(process, time_variable, as_time(s), t_min, t_max)
        vel = lambda y: dt_ds * pf_ode_velocity(eps_fn, process, y, t, cond)  # noqa: E731
        if divergence == "exact":
            v, div = exact_divergence(vel, x, chunk_size)
            return v, div[None]
        return hutchinson_divergence(vel, x, probes)

    return rhs


def _fixed_step(rhs, ts, state, args, solver):
    """Heun or classical RK4 on the increasing grid ts, as one `lax.scan`."""

    def step(y, tt):
        t0, t1 = tt[0], tt[1]
        h = t1 - t0
        add = lambda a, k, c: jax.tree_util.tree_map(lambda u, w: u + c * w, a, k)  # noqa: E731
        k1 = rhs(t0, y, args)
        if solver == "heun":
            k2 = rhs(t1, add(y, k1, h), args)
            return jax.tree_util.tree_map(lambda u, a, b: u + 0.5 * h * (a + b), y, k1, k2), None
        tm = t0 + 0.5 * h
        k2 = rhs(tm, add(y, k1, 0.5 * h), args)
        k3 = rhs(tm, add(y, k2, 0.5 * h), args)
        k4 = rhs(t1, add(y, k3, h), args)
        return jax.tree_util.tree_map(lambda u, a, b, c, d: u + h / 6.0 * (a + 2 * b + 2 * c + d),
                                      y, k1, k2, k3, k4), None

    pairs = jnp.stack([ts[:-1], ts[1:]], axis=-1)
    out, _ = jax.lax.scan(step, state, pairs)
    return out


def pf_ode_log_likelihood(eps_fn: EpsFn, process: Process, x, *, key=None, cond=None,
                          divergence: str = "hutchinson", probe: str = "rademacher", num_probes: int = 1,
                          t_min: Optional[float] = None, t_max: Optional[float] = None,
                          rtol: float = 1e-5, atol: float = 1e-5,
                          prior_logp: Optional[Callable[[Array], Array]] = None, solver: str = "tsit5",
                          time_variable: str = "log_snr", num_steps: int = 200, spacing: str = "logsnr",
                          max_steps: int = 16384, exact_chunk_size: int = 64) -> LikelihoodOutput:
    """log p_{t_min}(x) per example by integrating the probability-flow ODE with its divergence.

    Integrates  dx/dt = v = f x + g^2/(2 sigma) eps(x, t),  d delta/dt = div_x v  from t_min (x) to
    t_max (z), in the variable s = -lambda(t) (default) or t, and returns  logp = prior_logp(z) + delta.

    Args:
      eps_fn: the denoiser `eps_fn(x, t, cond)`; examples must not interact (no batch statistics).
      process: the forward process; t_min / t_max default to its own.
      x: data (B, ...) at t_min.
      key: seeds the Hutchinson probes (required for 'hutchinson', ignored for 'exact').
      divergence: 'exact' (D jvps per evaluation) or 'hutchinson' (`num_probes` jvps, probes fixed along
        the trajectory; each probe set gives its own estimate, see `LikelihoodOutput`).
      probe: 'rademacher' or 'gaussian'.
      prior_logp: log p_T(z) -> (B,); defaults to `process.prior_logp` (N(0, prior_std^2 I)).
      solver: 'tsit5' / 'dopri5' (diffrax, PID controller with rtol, atol on the whole state; at most
        max_steps steps, else z and the log-densities are NaN), or fixed-step 'heun' / 'rk4' with
        `num_steps` steps between the times of `time_grid(process, num_steps, spacing)`, traversed upwards.
      time_variable: 'log_snr' (s = -lambda, default) or 't'.
      exact_chunk_size: basis vectors per vmapped batch of jvps for 'exact'.

    Jittable (jit the caller: eps_fn, process, prior_logp and the options are static).
    """
    _check("divergence", divergence, DIVERGENCES)
    _check("solver", solver, SOLVERS)
    _check("probe", probe, PROBES)
    _check("time_variable", time_variable, TIME_VARIABLES)
    t_min = process.t_min if t_min is None else float(t_min)
    t_max = process.t_max if t_max is None else float(t_max)
    process.check_t(np.asarray([t_min, t_max]), "likelihood time range (t_min, t_max)")
    if not t_max > t_min:
        raise ValueError(f"t_max must exceed t_min, got t_min={t_min}, t_max={t_max}")
    num_probes = int(num_probes)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")

    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be batched (B, ...), got shape {x.shape}")
    b = x.shape[0]
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("divergence='hutchinson' needs key= to draw its probes")
        probes = draw_probes(key, x.shape, num_probes, probe)
        p = num_probes
    else:
        probes, p = None, 1

    rhs = _augmented_rhs(eps_fn, process, divergence, time_variable, t_min, t_max, exact_chunk_size)
    to_s = (lambda t: as_time(t)) if time_variable == "t" else (lambda t: -process.log_snr(as_time(t)))
    state0 = (x, jnp.zeros((p, b), jnp.float32))
    args = (cond, probes)

    if solver in _ADAPTIVE:
        s0, s1 = to_s(t_min), to_s(t_max)
        # The FSAL solver state (first_step=False, f0) is handed in with f0 evaluated here once, so that
        # a rejected first step does not re-evaluate it: nfe is then exactly 1 + 6 * attempted steps.
        solver_state = (jnp.array(False), rhs(s0, state0, args))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs), _ADAPTIVE[solver](), t0=s0, t1=s1, dt0=(s1 - s0) / 64.0, y0=state0,
            args=args, solver_state=solver_state,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
        z, delta = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        z = jnp.where(ok, z, jnp.nan)
        delta = jnp.where(ok, delta, jnp.nan)
        nfe = 1 + 6 * sol.stats["num_steps"]
    else:
        from diffusion_jax.sampling.grids import time_grid  # lazily: the sampling package is large

        ss = to_s(time_grid(process, int(num_steps), spacing, t_start=t_max, t_end=t_min)[::-1])
        z, delta = _fixed_step(rhs, ss, state0, args, solver)
        nfe = _FIXED_EVALS[solver] * int(num_steps)

    prior = (process.prior_logp if prior_logp is None else prior_logp)(z)
    prior = jnp.asarray(prior, jnp.float32).reshape(b)
    delta_mean = jnp.mean(delta, axis=0)
    if divergence == "exact":
        stderr = jnp.zeros((b,), jnp.float32)
    elif p == 1:
        stderr = jnp.full((b,), jnp.nan, jnp.float32)
    else:
        stderr = jnp.std(delta, axis=0, ddof=1) / math.sqrt(p)
    return LikelihoodOutput(prior + delta_mean, prior, delta_mean, z, nfe, delta, stderr)


__all__ = [
    "DIVERGENCES", "PROBES", "SOLVERS", "TIME_VARIABLES", "LikelihoodOutput", "draw_probes", "exact_divergence",
    "hutchinson_divergence", "pf_ode_log_likelihood", "pf_ode_velocity",
]
