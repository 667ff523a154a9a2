"""EDM preconditioning and loss (Karras et al. 2022, "Elucidating the design space...").

The raw network F_theta is wrapped as the denoiser of x = x0 + sigma n (sigma = sigma/alpha of any
process, x = x_t / alpha):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,            sd = sigma_data

and trained with ln(sigma) ~ N(P_mean, P_std^2) and weight lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2
= 1/c_out^2, so that

    lambda ||D(x0 + sigma n, sigma) - x0||^2 = ||F_theta - F_target||^2,   F_target = (x0 - c_skip x)/c_out.

For data of std sd both the network input c_in x and the target F_target have unit variance at
every sigma.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.denoising import REDUCTIONS, reduce_per_example, split_batch
from diffusion_jax.objectives.time_sampling import check_option, edm_sigma_sample
from diffusion_jax.processes.base import Process, as_time, bcast
from diffusion_jax.processes.predictions import as_eps_fn


class EDMScalings(NamedTuple):
    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def edm_scalings(sigma, sigma_data: float = 0.5) -> EDMScalings:
    """(c_skip, c_out, c_in, c_noise) at noise levels sigma."""
    sigma = as_time(sigma)
    s2, d2 = sigma ** 2, sigma_data ** 2
    r = jax.lax.rsqrt(s2 + d2)
    return EDMScalings(d2 / (s2 + d2), sigma * sigma_data * r, r, 0.25 * jnp.log(sigma))


def edm_loss_weight(sigma, sigma_data: float = 0.5):
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""
    sigma = as_time(sigma)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_target(x0, x, sigma, sigma_data: float = 0.5):
    """The effective regression target of F_theta: (x0 - c_skip x) / c_out."""
    c = edm_scalings(sigma, sigma_data)
    return (x0 - bcast(c.c_skip, x) * x) / bcast(c.c_out, x)


def edm_precondition(raw_apply_fn: Callable, sigma_data: float = 0.5) -> Callable:
    """Wraps `raw_apply_fn(params, x, t, cond, *, train, rng)` (called with c_in x and t = c_noise) as
    EDM's denoiser `D(params, x, sigma, cond=None, *, train=False, rng=None) -> x0_hat` (float32),
    sigma a scalar or (B,)."""

    def denoiser(params, x, sigma, cond=None, *, train: bool = False, rng=None):
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.broadcast_to(as_time(sigma), (x.shape[0],))
        c = edm_scalings(sigma, sigma_data)
        f = raw_apply_fn(params, bcast(c.c_in, x) * x, c.c_noise, cond, train=train, rng=rng)
        if f.shape != x.shape:
            raise ValueError(f"the raw network must return an array shaped like x {tuple(x.shape)}, "
                             f"got {tuple(f.shape)}")
        return bcast(c.c_skip, x) * x + bcast(c.c_out, x) * f.astype(jnp.float32)

    return denoiser


def edm_eps_fn(raw_apply_fn: Callable, params, process: Process, *, sigma_data: float = 0.5):
    """The library's `eps_fn(x, t, cond)` of a preconditioned EDM network, for any process: D runs on
    x / alpha(t) at sigma = sigma(t)/alpha(t) and eps = (x - alpha D) / sigma (`as_eps_fn(.., 'edm')`)."""
    denoiser = edm_precondition(raw_apply_fn, sigma_data)
    return as_eps_fn(lambda x, s, cond: denoiser(params, x, s, cond), "edm", process)


def edm_loss(raw_apply_fn: Callable, *, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
             reduce: str = "mean", train: bool = True, return_per_example: bool = False):
    """EDM's training loss  E_{sigma, x0, n} lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2  with
    ln(sigma) ~ N(p_mean, p_std^2) -> `loss_fn(params, batch, rng) -> (loss, aux)`.

    reduce='mean' averages over the non-batch axes (EDM's code sums: reduce='sum'). A batch may carry
    its own noise levels batch['sigma'] (B,). aux: 'loss', 'mse' (||D - x0||^2), 'weight' (mean
    lambda), and with return_per_example aux['per_example'] = {'loss', 'sigma'}.
    """
    check_option("reduce", reduce, REDUCTIONS)
    denoiser = edm_precondition(raw_apply_fn, sigma_data)

    def loss_fn(params, batch, rng):
        x0, cond = split_batch(batch)
        k_s, k_n, k_drop = jax.random.split(rng, 3)
        n = x0.shape[0]
        if "sigma" in batch:
            sigma = jnp.broadcast_to(as_time(batch["sigma"]), (n,))
        else:
            sigma = edm_sigma_sample(k_s, n, p_mean, p_std)
        x = x0 + bcast(sigma, x0) * jax.random.normal(k_n, x0.shape, jnp.float32)
        d = denoiser(params, x, sigma, cond, train=train, rng=k_drop)
        mse = reduce_per_example((d - x0) ** 2, reduce)
        lam = edm_loss_weight(sigma, sigma_data)
        per_example = lam * mse
        loss = jnp.mean(per_example)
        aux = {"loss": loss, "mse": jnp.mean(mse), "weight": jnp.mean(lam)}
        if return_per_example:
            aux["per_example"] = {"loss": per_example, "sigma": sigma}
        return loss, aux

    return loss_fn
