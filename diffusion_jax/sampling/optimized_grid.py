"""Time grids optimised for a given sampler, denoiser and step budget.

A fixed spacing (uniform, quadratic, log-SNR, Karras) spends its N steps the same way for every data
distribution. Learned schedules (Watson et al. 2021, "Learning to efficiently sample"; Sabour et al. 2024,
"Align your steps"; Xue et al. 2024, "Accelerating diffusion sampling with optimized time steps") instead
place them where the probability-flow trajectories of *this* model bend. Here the grid is parametrised by
its log-SNR increments,

    lambda_i = lambda(t_start) + (lambda(t_end) - lambda(t_start)) * sum_{j < i} softmax(theta)_j,
    t_i = lambda^{-1}(lambda_i),

so it is always decreasing in t with pinned end points, and theta minimises the mean squared distance
between the N-step solution and a high-accuracy probability-flow ODE solution from the same x_T,

    L(theta) = E_{x_T} || Phi_N(x_T; t(theta)) - Phi_ref(x_T) ||^2,

by Adam, differentiating through the (scanned) sampler. Fit on calibration draws of x_T and check on
held-out ones (the benchmark does): the grid is a property of the model, not of the x_T it was fit on.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.processes.base import Process
from diffusion_jax.sampling.grids import SPACINGS, time_grid


class GridFit(NamedTuple):
    ts: jnp.ndarray            # (N + 1,) decreasing times, the best grid found (lowest calibration loss)
    loss: jnp.ndarray          # its calibration loss, mean ||x_N - x_ref||^2
    init_loss: jnp.ndarray     # the loss of the initial spacing
    history: jnp.ndarray       # (iters,) the loss at every Adam step


def _grid_from_theta(process: Process, theta, lam_start, lam_end, t_start, t_end):
    w = jax.nn.softmax(theta)
    frac = jnp.concatenate([jnp.zeros((1,), w.dtype), jnp.cumsum(w)])
    ts = process.t_from_log_snr(lam_start + (lam_end - lam_start) * frac)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def optimize_time_grid(name: str, eps_fn: Callable, process: Process, x_T, *, num_steps: int,
                       x_ref=None, cond: Any = None, init: str = "best", iters: int = 300,
                       learning_rate: float = 0.05, t_start: float | None = None,
                       t_end: float | None = None, **options) -> GridFit:
    """Fits an N-step time grid for deterministic sampler `name` (see module docstring).

    x_T: calibration states at t_start (a batch); x_ref: their reference solutions at t_end (computed
    with `reference_solution` when None). `init`: the spacing to start from, or 'best' (default),
    the fixed spacing with the lowest calibration loss, so the fit is never worse than it on the
    calibration states. The whole Adam loop is one jitted `lax.scan`. Returns the grid with the
    lowest calibration loss; pass it to `sample(..., ts=fit.ts)`.
    """
    from diffusion_jax.sampling import get_sampler  # the registry imports this module's package
    from diffusion_jax.sampling.ode import reference_solution

    spec = get_sampler(name)
    if not spec.deterministic_ode or name == "adaptive":
        raise ValueError(f"optimize_time_grid needs a fixed-grid deterministic sampler; {name!r} is "
                         f"{'adaptive' if name == 'adaptive' else 'stochastic'}")
    if init != "best" and init not in SPACINGS:
        raise ValueError(f"unknown initial spacing {init!r}; expected 'best' or one of {SPACINGS}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    candidates = SPACINGS if init == "best" else (init,)
    grids = [time_grid(process, num_steps, sp, t_start=t_start, t_end=t_end) for sp in candidates]
    ts0 = grids[0]
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2:
        raise ValueError(f"x_T must be a batch (batch, ...) of calibration states, got shape {x_T.shape}")
    if x_ref is None:
        x_ref = jax.jit(lambda x: reference_solution(eps_fn, process, x, ts0[0], ts0[-1], cond))(x_T)
    x_ref = jnp.asarray(x_ref, jnp.float32)
    if x_ref.shape != x_T.shape:
        raise ValueError(f"x_ref has shape {x_ref.shape} but x_T has shape {x_T.shape}")
    options = dict(options)
    if len(grids) > 1:  # init='best': the fixed spacing with the lowest calibration loss (NaN never wins)
        run = jax.jit(lambda ts: _grid_loss(spec.fn, eps_fn, process, x_T, x_ref, cond, ts, options))
        losses = [float(run(ts)) for ts in grids]
        ts0 = grids[min(range(len(grids)), key=lambda i: losses[i] if losses[i] == losses[i] else float("inf"))]
    return _fit(spec.fn, eps_fn, process, x_T, x_ref, cond, ts0, iters, float(learning_rate), options)


@jax.jit
def _theta_from_grid(lam):
    return jnp.log(jnp.maximum(jnp.abs(jnp.diff(lam)), 1e-6))


def _grid_loss(fn, eps_fn, process, x_T, x_ref, cond, ts, options):
    """mean_b || Phi(x_T[b]; ts) - x_ref[b] ||^2."""
    x = fn(eps_fn, process, x_T, ts, cond=cond, **options).x
    return jnp.mean(jnp.sum(jnp.reshape(x - x_ref, (x.shape[0], -1)) ** 2, -1))


def _fit(fn, eps_fn, process, x_T, x_ref, cond, ts0, iters, learning_rate, options):
    lam = process.log_snr(ts0)
    t_start, t_end = ts0[0], ts0[-1]

    def loss_fn(theta):
        ts = _grid_from_theta(process, theta, lam[0], lam[-1], t_start, t_end)
        return _grid_loss(fn, eps_fn, process, x_T, x_ref, cond, ts, options)

    opt = optax.adam(learning_rate)

    @jax.jit
    def run(theta0):
        def step(carry, _):
            theta, opt_state, best_theta, best_loss = carry
            loss, grad = jax.value_and_grad(loss_fn)(theta)
            better = loss < best_loss  # NaN compares False, so a diverged step is never kept
            best_theta = jnp.where(better, theta, best_theta)
            best_loss = jnp.where(better, loss, best_loss)
            updates, opt_state = opt.update(grad, opt_state)
            return (optax.apply_updates(theta, updates), opt_state, best_theta, best_loss), loss

        init = (theta0, opt.init(theta0), theta0, jnp.asarray(jnp.inf, jnp.float32))
        (theta, opt_state, best_theta, best_loss), history = jax.lax.scan(step, init, None, length=iters)
        last = loss_fn(theta)  # the final iterate is a candidate too
        best_theta = jnp.where(last < best_loss, theta, best_theta)
        best_loss = jnp.where(last < best_loss, last, best_loss)
        return best_theta, best_loss, history

    theta0 = _theta_from_grid(lam)
    best_theta, best_loss, history = run(theta0)
    ts = _grid_from_theta(process, best_theta, lam[0], lam[-1], t_start, t_end)
    return GridFit(ts=ts, loss=best_loss, init_loss=history[0], history=history)
