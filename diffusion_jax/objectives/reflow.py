"""The k-rectified-flow objective on coupled pairs (Liu, Gong, Liu 2023, 'reflow').

Given pairs (x0, x1) = (data end, noise end) of the previous flow's ODE (`sampling.reflow.draw_pairs`),
the next flow regresses the velocity of the path through each pair,

    L = E_t E_{(x0, x1)} || u_theta(x_t, t) - (alpha'(t) x0 + sigma'(t) x1) ||^2,   x_t = alpha x0 + sigma x1,

which on the linear path (`Flow`) is Liu et al.'s E||(x1 - x0) - v(x_t, t)||^2 with x_t = (1 - t) x0 + t x1
(data at t = 0 here). It is the flow-matching loss with the independent noise replaced by the paired one.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.denoising import REDUCTIONS, _batch_time, _network, reduce_per_example, split_batch
from diffusion_jax.objectives.time_sampling import TIME_SAMPLINGS, check_option, check_time_options
from diffusion_jax.processes.predictions import flow_rates

__all__ = ["reflow_loss"]


def reflow_loss(process, apply_fn, *, time_sampling: str = "uniform", reduce: str = "mean", train: bool = True,
                logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
    """loss_fn(params, batch, rng) -> (loss, aux) on a batch {'x': data ends x0 (B, ...), 'noise': their
    paired noise x1 (B, ...), 'cond': optional, 't': optional fixed times}; apply_fn(params, x, t, cond,
    train=, rng=) returns the velocity (prediction 'flow'). Times are drawn as in `denoising_loss`
    (time_sampling, SD3's logit_mean/logit_std/mode_scale); aux holds loss and mse."""
    check_option("time sampling", time_sampling, TIME_SAMPLINGS)
    check_option("reduce", reduce, REDUCTIONS)
    time_options = check_time_options(time_sampling, logit_mean=logit_mean, logit_std=logit_std,
                                      mode_scale=mode_scale)

    def loss_fn(params, batch, rng):
        x0, cond = split_batch(batch)
        if not isinstance(batch, Mapping) or "noise" not in batch:
            raise KeyError("a reflow batch holds the paired noise under 'noise' (the ODE's start for 'x')")
        x1 = jnp.asarray(batch["noise"], jnp.float32)
        if x1.shape != x0.shape:
            raise ValueError(f"batch['noise'] must be shaped like batch['x'] {x0.shape}, got {x1.shape}")
        k_t, k_drop = jax.random.split(rng)
        ts = _batch_time(process, batch, k_t, x0.shape[0], time_sampling, False, time_options)
        a, s, da, ds, _ = flow_rates(process, ts.t, x0)
        out = _network(apply_fn, params, a * x0 + s * x1, ts.t, cond, train, k_drop)
        mse = reduce_per_example((out - (da * x0 + ds * x1)) ** 2, reduce)
        loss = jnp.mean(ts.weight * mse)
        return loss, {"loss": loss, "mse": jnp.mean(mse)}

    return loss_fn
