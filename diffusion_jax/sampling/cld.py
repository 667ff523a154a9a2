"""Samplers for critically-damped Langevin diffusion in phase space (Dockhorn et al. 2022, nv-tlabs/CLD-SGM
`sampling.py`), driven by a velocity score `score_v_fn(x, v, t) -> grad_v log p_t(x, v)` (the exact mixture
score of `reference.cld_mixtures.score_v_fn`, or a network through `objectives.cld.cld_score_fn`).

With f(u, t) = (M^-1 beta v, -beta x - Gamma M^-1 beta v) and noise sqrt(2 Gamma beta) on v only, on a
decreasing grid ts (t -> s, h = t - s > 0):

  reverse SDE (Euler-Maruyama)   x_s = x_t - h f_x,
                                 v_s = v_t - h (f_v - 2 Gamma beta s_v) + sqrt(2 Gamma beta(t) h) z
  probability-flow ODE           du/dt = (f_x, f_v - Gamma beta s_v)       (Euler, Heun or RK4 in t)
  SSCS (symmetric splitting)     the reverse drift -f + (0, 2 Gamma beta s_v) splits into the linear,
                                 noisy part A_rev u = (-M^-1 beta v, beta x - Gamma M^-1 beta v) (an
                                 Ornstein-Uhlenbeck process: CLD with v -> -v, solved exactly by
                                 `CLD.transition(B, reverse=True)`) and the score part
                                 dv = 2 Gamma beta (s_v + M^-1 v) dtau (zero for the prior's score -v/M);
                                 one step = exact OU half-step over [t_mid, t], an Euler step of the score
                                 part over the whole step (integrated beta, s_v at t_mid), exact OU half-step
                                 over [s, t_mid]. One score evaluation per step.

`denoise=True` appends the official final step: one noise-free Euler-Maruyama step of the reverse SDE from
ts[-1] to t = 0 (returns its mean; one more NFE). All loops are one `lax.scan`; the state is float32 (float64
under x64) whatever the score's dtype; noise comes from `key` (fold_in per step) or is injected.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.processes.base import as_time
from diffusion_jax.processes.cld import CLD
from diffusion_jax.sampling.ancestral import state_dtype
from diffusion_jax.sampling.common import step_noise, track_nonfinite

ScoreVFn = Callable[[Any, Any, Any], Any]
STRIDINGS = ("linear", "quadratic")
PF_SOLVERS = ("euler", "heun", "rk4")
SCORE_TIMES = ("mid", "start")
_PF_EVALS = {"euler": 1, "heun": 2, "rk4": 4}


class CLDSamplerOutput(NamedTuple):
    """x, v: the final phase-space state; nfe: score evaluations; nonfinite_step: first step whose state
    was NaN/inf (-1 if none)."""

    x: jax.Array
    v: jax.Array
    nfe: int
    nonfinite_step: jax.Array


def cld_time_grid(process: CLD, num_steps: int, striding: str = "linear", t_start=None, t_end=None):
    """Decreasing times t_0 = t_start (default t_max) > ... > t_N = t_end (default t_min): 'linear', or the
    official 'quadratic' striding t_i = t_end + (t_start - t_end) ((N - i)/N)^2 (fine steps near the data)."""
    if striding not in STRIDINGS:
        raise ValueError(f"unknown striding {striding!r}; expected one of {STRIDINGS}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    t0 = process.t_max if t_start is None else float(t_start)
    t1 = process.t_min if t_end is None else float(t_end)
    u = jnp.arange(num_steps, -1, -1, dtype=as_time(0.0).dtype) / num_steps   # 1 -> 0
    frac = u if striding == "linear" else u * u
    return as_time(t1 + (t0 - t1) * frac)


def _score(score_v_fn, x, v, t, dtype):
    return score_v_fn(x, v, jnp.full((x.shape[0],), t, dtype=jnp.result_type(t))).astype(dtype)


def pf_ode_velocity(score_v_fn: ScoreVFn, process: CLD, x, v, t):
    """(dx/dt, dv/dt) = (M^-1 beta v, -beta x - Gamma M^-1 beta v - Gamma beta s_v) at a scalar time t."""
    fx, fv = process.drift(x, v, t)
    s = _score(score_v_fn, x, v, t, x.dtype)
    return fx, fv - 0.5 * process.g2(t) * s


def _reverse_em(process, x, v, s, t, h, z, noise_scale):
    """One Euler-Maruyama step of the reverse SDE from t to t - h given the score s at (x, v, t)."""
    fx, fv = process.drift(x, v, t)
    g2 = process.g2(t)
    return x - h * fx, v - h * (fv - g2 * s) + noise_scale * jnp.sqrt(g2 * h) * z


def _check(process, ts):
    if not isinstance(process, CLD):
        raise ValueError(f"this sampler needs a CLD process, got {type(process).__name__}")
    ts = as_time(ts)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-d grid of at least 2 times, got shape {ts.shape}")
    process.check_t(ts, "sampler grid ts")
    return ts


def _start(x, v):
    dtype = state_dtype(x)
    return jnp.asarray(x, dtype), jnp.asarray(v, dtype), dtype


def _denoise(score_v_fn, process, x, v, t, dtype):
    s = _score(score_v_fn, x, v, t, dtype)
    return _reverse_em(process, x, v, s, t, t, jnp.zeros_like(v), 0.0)


def _finish(score_v_fn, process, x, v, bad, n, ts, dtype, denoise):
    if denoise:
        x, v = _denoise(score_v_fn, process, x, v, ts[-1], dtype)
        x, v = x.astype(dtype), v.astype(dtype)
        bad = track_nonfinite(bad, n, jnp.stack([x, v]))
    return CLDSamplerOutput(x, v, n + int(denoise), bad)


def cld_euler_maruyama(score_v_fn: ScoreVFn, process: CLD, x, v, ts, *, key=None, noise=None,
                       denoise: bool = False) -> CLDSamplerOutput:
    """Euler-Maruyama on the reverse phase-space SDE over the decreasing grid ts (noise at every step, as
    the official sampler). Injected noise: (N, *x.shape), for v. NFE = N (+1 with denoise)."""
    ts = _check(process, ts)
    x, v, dtype = _start(x, v)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    n = ts.shape[0] - 1

    def step(carry, inp):
        x, v, bad = carry
        i, t, s_ = inp
        score = _score(score_v_fn, x, v, t, dtype)
        z = step_noise(key, noise, i, x.shape, dtype)
        x, v = _reverse_em(process, x, v, score, t, t - s_, z, 1.0)
        x, v = x.astype(dtype), v.astype(dtype)
        return (x, v, track_nonfinite(bad, i, jnp.stack([x, v]))), None

    (x, v, bad), _ = jax.lax.scan(step, (x, v, jnp.asarray(-1, jnp.int32)), (jnp.arange(n), ts[:-1], ts[1:]))
    return _finish(score_v_fn, process, x, v, bad, n, ts, dtype, denoise)


def _ou_half_step(process, x, v, b, zx, zv):
    """The exact reverse-time OU step over integrated rate b: u <- S Phi(b) S u + chol(S Q(b) S) z."""
    tr = process.transition(b, reverse=True)
    c = process.propagate(tr, 0.0, 0.0, 0.0)
    return (tr.pxx * x + tr.pxv * v + c.lxx * zx,
            tr.pvx * x + tr.pvv * v + c.lvx * zx + c.lvv * zv)


def cld_sscs(score_v_fn: ScoreVFn, process: CLD, x, v, ts, *, key=None, noise=None, denoise: bool = False,
             score_time: str = "mid") -> CLDSamplerOutput:
    """Symmetric splitting CLD sampler (SSCS, Dockhorn et al. 2022 Alg. 1; module docstring) over the
    decreasing grid ts. score_time: 'mid' evaluates the score at the step's midpoint time, where the state
    is after the first half-step; 'start' at its start time t (the official code). Injected noise:
    (N, 4, *x.shape) (x and v draws of the two half-steps). NFE = N (+1 with denoise)."""
    if score_time not in SCORE_TIMES:
        raise ValueError(f"unknown score_time {score_time!r}; expected one of {SCORE_TIMES}")
    ts = _check(process, ts)
    x, v, dtype = _start(x, v)
    noise = None if noise is None else jnp.asarray(noise, dtype)
    n = ts.shape[0] - 1

    def step(carry, inp):
        x, v, bad = carry
        i, t, s_ = inp
        tm = 0.5 * (t + s_)
        bt, bm, bs = process.beta_int(t), process.beta_int(tm), process.beta_int(s_)
        z = [step_noise(key, noise, i, x.shape, dtype, k=k) for k in range(4)]
        x, v = _ou_half_step(process, x, v, bt - bm, z[0], z[1])
        score = _score(score_v_fn, x, v, tm if score_time == "mid" else t, dtype)
        v = v + 2.0 * process.big_gamma * (bt - bs) * (score + process.m_inv * v)
        x, v = _ou_half_step(process, x, v, bm - bs, z[2], z[3])
        x, v = x.astype(dtype), v.astype(dtype)
        return (x, v, track_nonfinite(bad, i, jnp.stack([x, v]))), None

    (x, v, bad), _ = jax.lax.scan(step, (x, v, jnp.asarray(-1, jnp.int32)), (jnp.arange(n), ts[:-1], ts[1:]))
    return _finish(score_v_fn, process, x, v, bad, n, ts, dtype, denoise)


def cld_pf_ode(score_v_fn: ScoreVFn, process: CLD, x, v, ts, *, solver: str = "heun",
               denoise: bool = False) -> CLDSamplerOutput:
    """The probability-flow ODE du/dt = (f_x, f_v - Gamma beta s_v) from ts[0] to ts[-1] with fixed-step
    Euler, Heun (2nd order) or classical RK4. NFE = (1, 2, 4) per step (+1 with denoise)."""
    if solver not in PF_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {PF_SOLVERS}")
    ts = _check(process, ts)
    x, v, dtype = _start(x, v)
    n = ts.shape[0] - 1
    vel = lambda x, v, t: pf_ode_velocity(score_v_fn, process, x, v, t)  # noqa: E731

    def step(carry, inp):
        x, v, bad = carry
        i, t, s_ = inp
        h = s_ - t                          # negative
        k1 = vel(x, v, t)
        if solver == "euler":
            dx, dv = k1
        elif solver == "heun":
            k2 = vel(x + h * k1[0], v + h * k1[1], s_)
            dx, dv = 0.5 * (k1[0] + k2[0]), 0.5 * (k1[1] + k2[1])
        else:
            tm = t + 0.5 * h
            k2 = vel(x + 0.5 * h * k1[0], v + 0.5 * h * k1[1], tm)
            k3 = vel(x + 0.5 * h * k2[0], v + 0.5 * h * k2[1], tm)
            k4 = vel(x + h * k3[0], v + h * k3[1], s_)
            dx = (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]) / 6.0
            dv = (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1]) / 6.0
        x, v = (x + h * dx).astype(dtype), (v + h * dv).astype(dtype)
        return (x, v, track_nonfinite(bad, i, jnp.stack([x, v]))), None

    (x, v, bad), _ = jax.lax.scan(step, (x, v, jnp.asarray(-1, jnp.int32)), (jnp.arange(n), ts[:-1], ts[1:]))
    out = _finish(score_v_fn, process, x, v, bad, n, ts, dtype, denoise)
    return out._replace(nfe=_PF_EVALS[solver] * n + int(denoise))


CLD_SAMPLERS = {"em": cld_euler_maruyama, "sscs": cld_sscs, "ode": cld_pf_ode}


def cld_sample(name: str, score_v_fn: ScoreVFn, process: CLD, key, shape, *, num_steps: int = 100,
               striding: str = "linear", ts=None, x_init=None, v_init=None, **options) -> CLDSamplerOutput:
    """Draws (x, v) from the prior N(0, I) x N(0, M I) (or x_init, v_init) and runs sampler `name`
    ('em', 'sscs', 'ode') on `ts` or `cld_time_grid(process, num_steps, striding)`."""
    if name not in CLD_SAMPLERS:
        raise ValueError(f"unknown CLD sampler {name!r}; expected one of {tuple(CLD_SAMPLERS)}")
    k_prior, k_run = jax.random.split(key)
    if x_init is None or v_init is None:
        x0, v0 = process.prior_sample(k_prior, tuple(shape))
        x_init = x0 if x_init is None else x_init
        v_init = v0 if v_init is None else v_init
    ts = cld_time_grid(process, num_steps, striding) if ts is None else ts
    if name != "ode":
        options.setdefault("key", k_run)
    return CLD_SAMPLERS[name](score_v_fn, process, x_init, v_init, ts, **options)


__all__ = ["CLDSamplerOutput", "CLD_SAMPLERS", "STRIDINGS", "PF_SOLVERS", "cld_time_grid", "cld_euler_maruyama",
           "cld_sscs", "cld_pf_ode", "cld_sample", "pf_ode_velocity"]
