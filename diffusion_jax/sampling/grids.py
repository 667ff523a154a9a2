"""Time-step spacings for samplers: decreasing grids t_0 = t_start > ... > t_N = t_end.

  uniform    t_i = t_start + (t_end - t_start) i / N
  quadratic  t_i = (sqrt(t_start) + (sqrt(t_end) - sqrt(t_start)) i / N)^2      (DDIM/DPM-Solver 'time_quadratic')
  logsnr     lambda(t_i) uniform between lambda(t_start) and lambda(t_end)       (DPM-Solver 'logSNR')
  karras     sigma_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho in EDM's sigma = sigma/alpha,
             rho = 7 (Karras et al. 2022), mapped back to t
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time

SPACINGS = ("uniform", "quadratic", "logsnr", "karras")


def time_grid(process: Process, num_steps: int, spacing: str = "uniform", *, t_start: float | None = None,
              t_end: float | None = None, rho: float = 7.0) -> jnp.ndarray:
    """The N + 1 times of an N-step sampler, from t_start (default t_max) down to t_end (default t_min)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown time-step spacing {spacing!r}; expected one of {SPACINGS}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    t_start = process.t_max if t_start is None else float(t_start)
    t_end = process.t_min if t_end is None else float(t_end)
    process.check_t(jnp.asarray([t_start, t_end]), "sampler time range (t_start, t_end)")
    if not t_start > t_end:
        raise ValueError(f"t_start must exceed t_end, got t_start={t_start}, t_end={t_end}")
    u = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=as_time(0.0).dtype)
    if spacing == "uniform":
        ts = t_start + (t_end - t_start) * u
    elif spacing == "quadratic":
        a, b = t_start ** 0.5, t_end ** 0.5
        ts = (a + (b - a) * u) ** 2
    elif spacing == "logsnr":
        l0, l1 = process.log_snr(as_time(t_start)), process.log_snr(as_time(t_end))
        ts = process.t_from_log_snr(l0 + (l1 - l0) * u)
    else:
        s0, s1 = process.edm_sigma(as_time(t_start)), process.edm_sigma(as_time(t_end))
        sig = (s0 ** (1 / rho) + u * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
        ts = process.t_from_edm_sigma(sig)
    # Pin the end points exactly (the inverse maps are accurate only to rounding).
    return ts.at[0].set(t_start).at[-1].set(t_end)


def check_grid(process: Process, ts) -> jnp.ndarray:
    """Validates an explicit time grid: 1-D, at least two times, strictly decreasing, inside the process range."""
    ts = jnp.asarray(ts, as_time(0.0).dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"a time grid must be 1-D with at least 2 times, got shape {ts.shape}")
    if not bool(jnp.all(jnp.diff(ts) < 0)):
        raise ValueError(f"a time grid must be strictly decreasing, got {ts}")
    process.check_t(ts, "time grid")
    return ts
