"""Phase-space likelihood of critically-damped Langevin diffusion (Dockhorn et al. 2022, Sec. 3.4 / App. B;
nv-tlabs/CLD-SGM `likelihood.py`).

The probability-flow ODE du/dt = w(u, t) = (M^-1 beta v, -beta x - Gamma M^-1 beta v - Gamma beta s_v(u, t))
carries p_{t0}(x, v) to the prior, so (as in `pf_ode`) with u_{t0} = (x, v) and z = u_{t1}

    log p_{t0}(x, v) = log N(z; 0, diag(1, M)) + int_{t0}^{t1} div_u w(u_t, t) dt,

integrated here in t with diffrax (Tsit5 / Dopri5, PID controller) or fixed-step Heun / RK4, the divergence
exact (2D jvps) or Hutchinson's (probes fixed along the trajectory); the pieces are `pf_ode`'s.

The data likelihood: the data law is p(x0) N(v0; 0, gamma M I), so for any model density p(x0, v0),

    log p(x0) >= E_{v0 ~ N(0, gamma M)} [log p(x0, v0)] + H(N(0, gamma M I)),    H = (D/2) log(2 pi e gamma M),

(Jensen; the paper's bound, the official code subtracts H from the NLL). `cld_likelihood_bound` draws v0,
integrates from t0 = likelihood_eps (official 1e-5) and returns this bound (`bound`) and, per draw, the
importance form log p(x0, v0) - log N(v0; 0, gamma M) (`bound_v0`, same expectation, and exactly log p(x0)
when the model is exact and t0 -> 0).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.likelihood.pf_ode import (
    DIVERGENCES, PROBES, _fixed_step, draw_probes, exact_divergence, hutchinson_divergence,
)
from diffusion_jax.processes.base import as_time
from diffusion_jax.processes.cld import CLD

CLD_SOLVERS = ("tsit5", "dopri5", "heun", "rk4")
_ADAPTIVE = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
_FIXED_EVALS = {"heun": 2, "rk4": 4}


class CLDLikelihoodOutput(NamedTuple):
    """logp (B,): log p_{t0}(x, v) (mean over probes); prior_logp, delta_logp (B,); z_x, z_v at t1;
    nfe; delta_logp_probes (P, B)."""

    logp: jax.Array
    prior_logp: jax.Array
    delta_logp: jax.Array
    z_x: jax.Array
    z_v: jax.Array
    nfe: Any
    delta_logp_probes: jax.Array


class CLDBoundOutput(NamedTuple):
    """bound (B,): mean over v0 draws of log p(x0, v0) + H; bound_v0 (K, B): log p(x0, v0) - log q(v0) per
    draw; logp_joint (K, B); nfe; v0 (K, B, ...): the draws."""

    bound: jax.Array
    bound_v0: jax.Array
    logp_joint: jax.Array
    nfe: Any
    v0: jax.Array


def _check(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; expected one of {valid}")


def cld_log_likelihood(score_v_fn, process: CLD, x, v, *, key=None, divergence: str = "hutchinson",
                       probe: str = "rademacher", num_probes: int = 1, t0=None, t1=None, solver: str = "tsit5",
                       rtol: float = 1e-5, atol: float = 1e-5, num_steps: int = 200, max_steps: int = 16384,
                       exact_chunk_size: int = 64) -> CLDLikelihoodOutput:
    """log p_{t0}(x, v) through the phase-space PF-ODE (module docstring); t0, t1 default to the process'
    t_min, t_max. `score_v_fn(x, v, t)` must not mix examples. Fixed-step solvers use a uniform grid in t."""
    _check("divergence", divergence, DIVERGENCES)
    _check("probe", probe, PROBES)
    _check("solver", solver, CLD_SOLVERS)
    if not isinstance(process, CLD):
        raise ValueError(f"cld_log_likelihood needs a CLD process, got {type(process).__name__}")
    t0 = process.t_min if t0 is None else float(t0)
    t1 = process.t_max if t1 is None else float(t1)
    if not 0.0 <= t0 < t1 <= process.t_max + 1e-6:
        raise ValueError(f"need 0 <= t0 < t1 <= t_max, got t0={t0}, t1={t1}")
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(v, jnp.float32)
    if x.ndim < 2 or x.shape != v.shape:
        raise ValueError(f"x and v must be batched (B, ...) and of one shape, got {x.shape} and {v.shape}")
    b, shape = x.shape[0], x.shape
    d = int(np.prod(shape[1:]))
    u0 = jnp.concatenate([x.reshape(b, d), v.reshape(b, d)], -1)
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("divergence='hutchinson' needs key= to draw its probes")
        probes, p = draw_probes(key, u0.shape, int(num_probes), probe), int(num_probes)
    else:
        probes, p = None, 1

    def velocity(u, t):
        xx, vv = u[:, :d].reshape(shape), u[:, d:].reshape(shape)
        fx, fv = process.drift(xx, vv, t)
        s = score_v_fn(xx, vv, jnp.full((b,), t)).astype(u.dtype)
        return jnp.concatenate([fx.reshape(b, d), (fv - 0.5 * process.g2(t) * s).reshape(b, d)], -1)

    def rhs(t, state, args):
        u, _ = state
        t = as_time(t)
        fn = lambda y: velocity(y, t)  # noqa: E731
        if divergence == "exact":
            w, div = exact_divergence(fn, u, exact_chunk_size)
            return w, div[None]
        return hutchinson_divergence(fn, u, args)

    state0 = (u0, jnp.zeros((p, b), jnp.float32))
    if solver in _ADAPTIVE:
        s0, s1 = as_time(t0), as_time(t1)
        solver_state = (jnp.array(False), rhs(s0, state0, probes))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs), _ADAPTIVE[solver](), t0=s0, t1=s1, dt0=(s1 - s0) / 256.0, y0=state0,
            args=probes, solver_state=solver_state, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
        z, delta = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
        ok = sol.result == diffrax.RESULTS.successful
        z, delta = jnp.where(ok, z, jnp.nan), jnp.where(ok, delta, jnp.nan)
        nfe = 1 + 6 * sol.stats["num_steps"]
    else:
        ts = jnp.linspace(as_time(t0), as_time(t1), int(num_steps) + 1)
        z, delta = _fixed_step(rhs, ts, state0, probes, solver)
        nfe = _FIXED_EVALS[solver] * int(num_steps)
    zx, zv = z[:, :d].reshape(shape), z[:, d:].reshape(shape)
    prior = process.prior_logp(zx, zv)
    dmean = jnp.mean(delta, 0)
    return CLDLikelihoodOutput(prior + dmean, prior, dmean, zx, zv, nfe, delta)


def cld_likelihood_bound(score_v_fn, process: CLD, x0, key, *, num_v0: int = 1, t0: float = 1e-5,
                         **options) -> CLDBoundOutput:
    """The paper's lower bound on log p(x0) (module docstring) with `num_v0` draws v0 ~ N(0, gamma M I),
    integrating from t0 (official likelihood_eps = 1e-5). options: those of `cld_log_likelihood`."""
    x0 = jnp.asarray(x0, jnp.float32)
    k_v, k_p = jax.random.split(key)
    d = int(np.prod(x0.shape[1:]))
    logs, nfe, v0s = [], 0, []
    for k in range(int(num_v0)):
        v0 = math.sqrt(process.var0v) * jax.random.normal(jax.random.fold_in(k_v, k), x0.shape, jnp.float32)
        out = cld_log_likelihood(score_v_fn, process, x0, v0, key=jax.random.fold_in(k_p, k), t0=t0, **options)
        logs.append((out.logp, out.logp - process.v0_logp(v0)))
        v0s.append(v0)
        nfe = nfe + out.nfe
    joint = jnp.stack([a for a, _ in logs])
    per_draw = jnp.stack([b for _, b in logs])
    return CLDBoundOutput(jnp.mean(joint, 0) + process.v0_entropy(d), per_draw, joint, nfe, jnp.stack(v0s))


__all__ = ["CLD_SOLVERS", "CLDLikelihoodOutput", "CLDBoundOutput", "cld_log_likelihood", "cld_likelihood_bound"]
