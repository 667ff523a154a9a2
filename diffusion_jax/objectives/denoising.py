"""Denoising objectives as pure loss factories (score_sde's `get_sde_loss_fn` style).

    loss_fn = epsilon_loss(process, apply_fn, **options)
    loss, aux = loss_fn(params, batch, rng)          # jittable; batch = {'x': (B, ...), 'cond': ...}

`apply_fn(params, x, t, cond=None, *, train=False, rng=None)` is the network (`make_apply_fn`); it
sees x_t and t (B,) float32 (on a discrete DDPM process t = (n+1)/T for integer timesteps n). With
t from the time sampler, eps ~ N(0, I) and x_t = alpha(t) x0 + sigma(t) eps, every loss is

    L = mean_b [ w_is(t_b) lambda(t_b) || pred(x_t, t) - target ||^2 ]

with ||.||^2 the mean over the non-batch axes (reduce='mean', the default everywhere so that losses
compare across parameterisations and resolutions; reduce='sum' is score_sde's reduce_mean=False),
w_is the time sampler's importance weight (1 unless time_sampling='importance') and targets

    eps    eps                         (DDPM, Ho et al. 2020)
    x0     x0
    v      alpha eps - sigma x0        (Salimans & Ho 2022)
    score  grad log q(x_t|x0) = -eps / sigma      (denoising score matching, Vincent 2011)
    flow   alpha' x0 + sigma' eps     (conditional flow matching, Lipman et al. 2023; eps - x0 on the
                                       linear path of `processes.Flow`: rectified flow, SD3)

`aux` holds scalars: 'loss', 'mse' (unweighted squared error of the prediction), 'eps_mse' (the same
in eps space) and 'weight' (mean of w_is lambda); with return_per_example=True also
aux['per_example'] = {'loss', 'time_loss' (before w_is), 't'}, each (B,).

A batch may carry its own times: batch['t'] (B,) and optional batch['t_weight'] (B,) replace the time
sampler (e.g. improved DDPM's loss-aware sampler, see `time_sampling`).

input_perturbation = gamma > 0 is DDPM-IP (Ning et al. 2023): the network sees
x_t = alpha x0 + sigma (eps + gamma xi) with xi ~ N(0, I) independent of eps, while the target stays
eps (x0, v and score targets are built from the same unperturbed eps). gamma = 0 draws nothing extra
and is bit-identical to the plain loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.time_sampling import (TIME_SAMPLINGS, TimeSample, check_option,
                                                    check_time_options, is_discrete, sample_time)
from diffusion_jax.objectives.weighting import PREDICTIONS, WEIGHTINGS, loss_weight
from diffusion_jax.processes.base import Process, as_time, bcast
from diffusion_jax.processes.predictions import flow_rates

ApplyFn = Callable[..., Any]
LossFn = Callable[[Any, Mapping, Any], tuple[jax.Array, dict]]
REDUCTIONS = ("mean", "sum")


def split_batch(batch) -> tuple[jax.Array, Any]:
    """(x float32 (B, ...), cond or None) of a batch dict; KeyError if it has no 'x'."""
    if not isinstance(batch, Mapping) or "x" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"the batch must be a dict holding the data under 'x' (float (B, ...)) and "
                       f"optionally 'cond'; got {got}")
    x = jnp.asarray(batch["x"], jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"batch['x'] must be batched, shape (B, ...), got shape {x.shape}")
    return x, batch.get("cond")


def reduce_per_example(sq: jax.Array, reduce: str = "mean") -> jax.Array:
    """(B, ...) -> (B,): mean or sum over the non-batch axes."""
    axes = tuple(range(1, sq.ndim))
    return jnp.mean(sq, axes) if reduce == "mean" else jnp.sum(sq, axes)


def _network(apply_fn, params, x, t, cond, train, rng):
    out = apply_fn(params, x, t, cond, train=train, rng=rng)
    if out.shape != x.shape:
        raise ValueError(f"apply_fn must return an array shaped like x {tuple(x.shape)}, "
                         f"got {tuple(out.shape)}")
    return out.astype(jnp.float32)


def _batch_time(process, batch, key, n, time_sampling, discrete, time_options=None) -> TimeSample:
    if "t" in batch:
        t = jnp.broadcast_to(as_time(batch["t"]), (n,))
        w = jnp.broadcast_to(as_time(batch.get("t_weight", 1.0)), (n,))
        return TimeSample(t, w)
    return sample_time(process, key, n, time_sampling, discrete=discrete, **(time_options or {}))


def check_input_perturbation(gamma) -> float:
    """gamma as a float; ValueError unless it is finite and >= 0."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"input_perturbation must be a float >= 0, got {gamma!r}") from None
    if not (g >= 0.0 and g < float("inf")):
        raise ValueError(f"input_perturbation must be a finite float >= 0, got {gamma!r}")
    return g


def noisy_input(process: Process, x0, t, key, input_perturbation: float = 0.0):
    """(x_t, eps): eps ~ N(0, I) from `key` and x_t = alpha x0 + sigma (eps + gamma xi) (DDPM-IP) with
    xi ~ N(0, I) drawn from fold_in(key, 1) only when gamma > 0 (gamma = 0: x_t = alpha x0 + sigma eps)."""
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    a, s = bcast(process.alpha(t), x0), bcast(process.sigma(t), x0)
    if input_perturbation > 0.0:
        xi = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
        return a * x0 + s * (eps + input_perturbation * xi), eps
    return a * x0 + s * eps, eps


def denoising_loss(process: Process, apply_fn: ApplyFn, *, prediction: str = "eps", weighting: str = "none",
                   min_snr_gamma: float = 5.0, time_sampling: str = "uniform", discrete: bool | None = None,
                   reduce: str = "mean", train: bool = True, return_per_example: bool = False,
                   input_perturbation: float = 0.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> LossFn:
    """The general factory: L = E_t E_{x0, eps}[w_is lambda(t) ||pred(x_t, t) - target||^2].

    prediction: 'eps' | 'x0' | 'v' | 'score' | 'flow' (what apply_fn outputs; also the regression target).
    weighting: lambda(t), see `weighting.WEIGHTINGS[prediction]`.
    time_sampling: 'uniform' | 'stratified' | 'importance' | 'lognormal' | 'logit_normal' | 'mode'
    (`time_sampling`; logit_mean, logit_std and mode_scale are SD3's m, s and mode scale).
    discrete: integer DDPM timesteps (default: iff the process is a DiscreteDDPM).
    train: passed to apply_fn (dropout on, with the loss rng's dropout key).
    input_perturbation: DDPM-IP's gamma, x_t = alpha x0 + sigma (eps + gamma xi), target unchanged.
    """
    gamma = check_input_perturbation(input_perturbation)
    check_option("prediction", prediction, PREDICTIONS)
    check_option(f"weighting for {prediction!r} prediction", weighting, WEIGHTINGS[prediction])
    check_option("time sampling", time_sampling, TIME_SAMPLINGS)
    check_option("reduce", reduce, REDUCTIONS)
    discrete = is_discrete(process, discrete)
    time_options = check_time_options(time_sampling, logit_mean=logit_mean, logit_std=logit_std,
                                      mode_scale=mode_scale)

    def loss_fn(params, batch, rng):
        x0, cond = split_batch(batch)
        k_t, k_eps, k_drop = jax.random.split(rng, 3)
        ts = _batch_time(process, batch, k_t, x0.shape[0], time_sampling, discrete, time_options)
        t = ts.t
        xt, eps = noisy_input(process, x0, t, k_eps, gamma)
        a, s = bcast(process.alpha(t), x0), bcast(process.sigma(t), x0)
        out = _network(apply_fn, params, xt, t, cond, train, k_drop)
        if prediction == "eps":
            target, eps_hat = eps, out
        elif prediction == "x0":
            target, eps_hat = x0, (xt - a * out) / s
        elif prediction == "v":
            target, eps_hat = a * eps - s * x0, (s * xt + a * out) / (a * a + s * s)
        elif prediction == "flow":
            _, _, da, ds, det = flow_rates(process, t, x0)
            target, eps_hat = da * x0 + ds * eps, (a * out - da * xt) / det
        else:
            target, eps_hat = -eps / s, -s * out
        mse = reduce_per_example((out - target) ** 2, reduce)
        lam = loss_weight(process, t, weighting, prediction, min_snr_gamma=min_snr_gamma)
        time_loss = lam * mse
        per_example = ts.weight * time_loss
        loss = jnp.mean(per_example)
        aux = {
            "loss": loss,
            "mse": jnp.mean(mse),
            "eps_mse": jnp.mean(reduce_per_example((eps_hat - eps) ** 2, reduce)),
            "weight": jnp.mean(ts.weight * lam),
        }
        if return_per_example:
            aux["per_example"] = {"loss": per_example, "time_loss": time_loss, "t": t}
        return loss, aux

    return loss_fn


def epsilon_loss(process: Process, apply_fn: ApplyFn, *, weighting: str = "none", min_snr_gamma: float = 5.0,
                 time_sampling: str = "uniform", **options) -> LossFn:
    """DDPM's simple loss E||eps - eps_hat(x_t, t)||^2 (Ho et al. 2020); weighting 'none' | 'min_snr'
    (lambda = min(SNR, gamma)/SNR, Hang et al. 2023). Options pass through to `denoising_loss`
    (e.g. input_perturbation=0.1 for DDPM-IP)."""
    return denoising_loss(process, apply_fn, prediction="eps", weighting=weighting, min_snr_gamma=min_snr_gamma,
                          time_sampling=time_sampling, **options)


def x0_loss(process: Process, apply_fn: ApplyFn, *, weighting: str = "none", min_snr_gamma: float = 5.0,
            time_sampling: str = "uniform", **options) -> LossFn:
    """Data prediction E lambda ||x0 - x0_hat(x_t, t)||^2; weighting 'none' | 'snr' (lambda = SNR: equal,
    per example, to the eps loss of the implied eps_hat) | 'min_snr' (lambda = min(SNR, gamma))."""
    return denoising_loss(process, apply_fn, prediction="x0", weighting=weighting, min_snr_gamma=min_snr_gamma,
                          time_sampling=time_sampling, **options)


def v_loss(process: Process, apply_fn: ApplyFn, *, weighting: str = "none", min_snr_gamma: float = 5.0,
           time_sampling: str = "uniform", **options) -> LossFn:
    """v-prediction E lambda ||v - v_hat||^2, v = alpha eps - sigma x0 (Salimans & Ho 2022); per example
    ||v - v_hat||^2 = (alpha^2 + sigma^2)^2/alpha^2 ||eps - eps_hat||^2 ((SNR+1)/SNR for VP).
    weighting 'none' | 'min_snr' (VP: min(SNR, gamma)/(SNR + 1))."""
    return denoising_loss(process, apply_fn, prediction="v", weighting=weighting, min_snr_gamma=min_snr_gamma,
                          time_sampling=time_sampling, **options)


def flow_matching_loss(process: Process, apply_fn: ApplyFn, *, weighting: str = "none",
                       min_snr_gamma: float = 5.0, time_sampling: str = "uniform", **options) -> LossFn:
    """Conditional flow matching E lambda ||u - u_hat(x_t, t)||^2 with the velocity target
    u = alpha' x0 + sigma' eps (Lipman et al. 2023); on `Flow(path='linear')` u = eps - x0, rectified
    flow (Liu et al. 2023). Per example ||u - u_hat||^2 = (D/alpha)^2 ||eps - eps_hat||^2
    (D = alpha sigma' - sigma alpha'; 1/(1 - t)^2 on the linear path). SD3 (Esser et al. 2024) is
    time_sampling='logit_normal' (logit_mean=0, logit_std=1) or 'mode' (mode_scale=1.29).
    weighting 'none' | 'min_snr'. The network's output is the velocity: `as_eps_fn(fn, 'flow', process)`."""
    return denoising_loss(process, apply_fn, prediction="flow", weighting=weighting, min_snr_gamma=min_snr_gamma,
                          time_sampling=time_sampling, **options)


def score_matching_loss(process: Process, apply_fn: ApplyFn, *, weighting: str = "sigma2",
                        importance_sampling: bool = False, prediction: str = "score",
                        time_sampling: str = "uniform", **options) -> LossFn:
    """Denoising score matching E_t lambda(t) ||s_theta(x_t, t) - grad log q(x_t|x0)||^2, the target
    -eps/sigma (score_sde's `get_sde_loss_fn`).

    weighting: 'sigma2' (lambda = sigma^2, score_sde's default: per example equal to the eps loss of
    eps_hat = -sigma s_theta) or 'likelihood' (lambda = g^2, Song et al. 2021: with reduce='sum',
    (t_max - t_min)/2 times this loss is the score-matching term of the NLL bound up to a constant).
    importance_sampling: draw t with density proportional to g^2/sigma^2 and weight by 1/((t_max -
    t_min) p(t)); the estimator is unbiased for the same objective, and with 'likelihood' the weights
    cancel to the constant (lambda(t_min) - lambda(t_max)) / (t_max - t_min) times the eps error.
    prediction: 'score' (apply_fn outputs the score) or 'eps' (s_theta = -eps_hat/sigma).
    """
    check_option("score-matching prediction", prediction, ("score", "eps"))
    check_option("score-matching weighting", weighting, ("sigma2", "likelihood"))
    if importance_sampling:
        if time_sampling != "uniform":
            raise ValueError(f"importance_sampling=True draws its own times; got time_sampling={time_sampling!r}")
        time_sampling = "importance"
    def score_from_eps(params, x, t, cond=None, *, train=False, rng=None):
        eps_hat = apply_fn(params, x, t, cond, train=train, rng=rng).astype(jnp.float32)
        return -eps_hat / bcast(process.sigma(as_time(t)), x)

    net = score_from_eps if prediction == "eps" else apply_fn
    return denoising_loss(process, net, prediction="score", weighting=weighting, time_sampling=time_sampling,
                          **options)
