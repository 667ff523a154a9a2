"""The continuous-time ELBO of Variational Diffusion Models (Kingma et al. 2021; google-research/vdm).

The forward process is variance preserving with a (learnable) monotone gamma(t) = -log SNR(t), t in [0, 1]:

    z_t = alpha_t x + sigma_t eps,    alpha_t^2 = sigmoid(-gamma_t),    sigma_t^2 = sigmoid(gamma_t),

and the negative ELBO of data x (nats, summed over its D dimensions) is the sum of three terms:

    prior      L_prior = KL(q(z_1 | x) || N(0, I))
                       = 1/2 sum_i [ alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1 ]
    recon      L_recon = E_{eps_0} [ -log p(x | z_0) ],   z_0 / alpha_0 = x + exp(gamma_0 / 2) eps_0
    diffusion  L_diff  = 1/2 E_{t ~ U[0,1], eps} [ gamma'(t) || eps - eps_hat(z_t; t) ||^2 ]

(VDM eq. 17). gamma'(t) comes from `jax.jvp` of the schedule, as in VDM; t is drawn per batch with VDM's
low-discrepancy ("antithetic") sampler t_i = mod(u + i/B, 1), one u ~ U[0, 1) per batch, or i.i.d.

Data ('uint8'): pixel levels k in {0..255} are encoded as x = 2 (k + 1/2) / 256 - 1 (VDM's `encode`), and
p(x | z_0) factorises over pixels into VDM's discretised Gaussian decoder: with x_j the 256 encoded
levels and s_0 = exp(gamma_0 / 2),

    log p(k | z_0) = log_softmax_j( -(z_0/alpha_0 - x_j)^2 / (2 s_0^2) )[k].

Data ('continuous'): x is used as it is and p(x | z_0) = N(x; z_0/alpha_0, exp(gamma_0) I), so
L_recon = 1/2 sum_i [ eps_0,i^2 + log(2 pi) + gamma_0 ] (a density, hence a differential "bpd").

bits/dim (VDM's convention): bpd = (L_diff + L_prior + L_recon) / (D ln 2), averaged over the batch.

Time input of the denoiser: like VDM, the model sees gamma_t by default (`time_input='gamma'`: a (B,)
float32 vector of gamma_t, which VDM's ScoreUNet rescales to (gamma_t - gamma_min)/(gamma_max - gamma_min));
with `time_input='t'` it sees t in [0, 1] instead. Feeding gamma keeps the optimal denoiser independent
of the schedule's shape, which is what makes L_diff depend on the schedule only through its endpoints
(VDM's invariance result); with 't' the model must re-learn whenever the schedule moves.

Noise schedules (`NoiseSchedule`, a pure function gamma(t; params) of a plain-dict pytree):

    'fixed_linear'  gamma(t) = gamma_min + (gamma_max - gamma_min) t                      (params: {})
    'learned'       VDM's NoiseSchedule_NNet: monotone layers with |W|,
                    gamma(t) = |w1| t + b1 + |W3|^T (2 sigmoid(|W2| (2t - 1) + b2) - 1) / n_features,
                    W2, W3 ~ N(0, 0.01^2), b2 = 0; at init w1, b1 are set so that gamma(0) = gamma_min
                    and gamma(1) = gamma_max exactly (VDM sets w1 = gamma_max - gamma_min, b1 = gamma_min
                    and is off by the tiny non-linear part). The endpoints are learned afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.likelihood.bpd import as_levels
from diffusion_jax.processes.base import as_time

Array = jax.Array

SCHEDULES = ("learned", "fixed_linear")
DATA = ("uint8", "continuous")
TIME_INPUTS = ("gamma", "t")
VOCAB_SIZE = 256


def _check(what: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; expected one of {valid}")


# --- noise schedule -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """gamma(t; params) = -log SNR(t) on t in [0, 1], monotone increasing. Hashable; params a dict pytree."""

    kind: str = "learned"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    n_features: int = 1024

    def __post_init__(self):
        _check("noise schedule", self.kind, SCHEDULES)
        if not self.gamma_max > self.gamma_min:
            raise ValueError(f"need gamma_max > gamma_min, got {self.gamma_min}, {self.gamma_max}")

    def _nonlinear(self, params, t) -> Array:
        h = t[..., None] * jnp.abs(params["l2"]["kernel"][0]) + params["l2"]["bias"]
        h = 2.0 * (jax.nn.sigmoid(h) - 0.5)
        return (h @ jnp.abs(params["l3"]["kernel"]))[..., 0] / self.n_features

    def init(self, key) -> dict:
        """Parameters: {} for 'fixed_linear'; for 'learned' {'l1': {kernel (1, 1), bias (1,)},
        'l2': {kernel (1, n), bias (n,)}, 'l3': {kernel (n, 1)}}, endpoints exact at init."""
        if self.kind == "fixed_linear":
            return {}
        k2, k3 = jax.random.split(key)
        n = self.n_features
        params = {
            "l2": {"kernel": 0.01 * jax.random.normal(k2, (1, n), jnp.float32), "bias": jnp.zeros((n,), jnp.float32)},
            "l3": {"kernel": 0.01 * jax.random.normal(k3, (n, 1), jnp.float32)},
        }
        nl0, nl1 = self._nonlinear(params, 2.0 * jnp.array([0.0, 1.0]) - 1.0)
        w1 = (self.gamma_max - self.gamma_min) - (nl1 - nl0)
        params["l1"] = {"kernel": jnp.reshape(w1, (1, 1)), "bias": jnp.reshape(self.gamma_min - nl0, (1,))}
        return params

    def __call__(self, params, t) -> Array:
        """gamma(t), elementwise over t (any shape), in the schedule dtype (float32; float64 under x64)."""
        t = as_time(t)
        if self.kind == "fixed_linear":
            return self.gamma_min + (self.gamma_max - self.gamma_min) * t
        lin = jnp.abs(params["l1"]["kernel"][0, 0]) * t + params["l1"]["bias"][0]
        return lin + self._nonlinear(params, 2.0 * t - 1.0)

    def value_and_grad(self, params, t) -> tuple[Array, Array]:
        """(gamma(t), d gamma/dt) elementwise, the derivative by forward mode (`jax.jvp`), as VDM."""
        t = as_time(t)
        return jax.jvp(lambda s: self(params, s), (t,), (jnp.ones_like(t),))


def as_schedule(schedule, gamma_min: float = -13.3, gamma_max: float = 5.0,
                n_features: int = 1024) -> NoiseSchedule:
    """A NoiseSchedule from a kind ('learned' / 'fixed_linear') or an existing NoiseSchedule."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    return NoiseSchedule(schedule, float(gamma_min), float(gamma_max), int(n_features))


# --- the three terms ---------------------------------------------------------------------------------
def _sum_event(a: Array) -> Array:
    return jnp.sum(jnp.reshape(a, (a.shape[0], -1)), axis=-1)


def encode_levels(k) -> Array:
    """VDM's encoder: level k -> 2 (k + 1/2) / 256 - 1, the centre of k's cell in [-1, 1]."""
    return 2.0 * ((jnp.asarray(k, jnp.float32) + 0.5) / VOCAB_SIZE) - 1.0


def decoder_logprobs(z0_rescaled: Array, gamma_0) -> Array:
    """VDM's discretised Gaussian decoder: log p(k | z_0) for all 256 levels, shape z0.shape + (256,),
    log_softmax_k( -(z_0/alpha_0 - encode(k))^2 / (2 exp(gamma_0)) )."""
    levels = encode_levels(jnp.arange(VOCAB_SIZE))
    inv_std = jnp.exp(-0.5 * jnp.asarray(gamma_0, jnp.float32))
    logits = -0.5 * jnp.square((z0_rescaled[..., None] - levels) * inv_std)
    return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_loss(x_or_levels, z0_rescaled: Array, gamma_0, data: str = "uint8") -> Array:
    """-log p(x | z_0) per example (B,), given z_0 / alpha_0 (see the module docstring)."""
    _check("data", data, DATA)
    if data == "uint8":
        k = as_levels(x_or_levels).astype(jnp.int32)
        lp = jnp.take_along_axis(decoder_logprobs(z0_rescaled, gamma_0), k[..., None], axis=-1)[..., 0]
        return -_sum_event(lp)
    x = jnp.asarray(x_or_levels, jnp.float32)
    var = jnp.exp(jnp.asarray(gamma_0, jnp.float32))
    return _sum_event(0.5 * (jnp.square(x - z0_rescaled) / var + math.log(2 * math.pi)
                             + jnp.asarray(gamma_0, jnp.float32)))


def prior_loss(x: Array, gamma_1) -> Array:
    """KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)) per example (B,), alpha_1^2 = sigmoid(-gamma_1)."""
    g1 = jnp.asarray(gamma_1, jnp.float32)
    var1 = jax.nn.sigmoid(g1)
    return 0.5 * _sum_event(jax.nn.sigmoid(-g1) * jnp.square(x) + var1 - jax.nn.log_sigmoid(g1) - 1.0)


def _time_sample(key, batch: int, antithetic: bool) -> Array:
    if antithetic:
        u = jax.random.uniform(key, (), jnp.float32)
        return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return jax.random.uniform(key, (batch,), jnp.float32)


class VDMTerms(NamedTuple):
    """Per-example (B,) terms of the negative ELBO in nats, and the schedule's endpoints."""

    diffusion: Array
    prior: Array
    recon: Array
    gamma_0: Array
    gamma_1: Array


def vdm_terms(apply_fn: Callable, schedule: NoiseSchedule, params, x, rng, *, data: str = "uint8",
              cond: Any = None, train: bool = False, time_input: str = "gamma",
              antithetic: bool = True) -> VDMTerms:
    """One Monte-Carlo draw of the three VDM terms per example.

    rng is split as (k_eps0, k_t, k_eps, k_model) = jax.random.split(rng, 4): eps_0 for the
    reconstruction, the times, the diffusion noise, and the model's own rng (dropout).
    `apply_fn(params['model'], z_t, gamma_t or t (B,), cond, train=train, rng=k_model)` predicts eps.
    """
    _check("data", data, DATA)
    _check("time_input", time_input, TIME_INPUTS)
    sched_params = params.get("schedule", {})
    f = encode_levels(as_levels(x)) if data == "uint8" else jnp.asarray(x, jnp.float32)
    b = f.shape[0]
    k_eps0, k_t, k_eps, k_model = jax.random.split(rng, 4)
    g0, g1 = schedule(sched_params, jnp.float32(0.0)), schedule(sched_params, jnp.float32(1.0))

    # reconstruction: z_0 / alpha_0 = x + exp(gamma_0 / 2) eps_0
    eps0 = jax.random.normal(k_eps0, f.shape, jnp.float32)
    z0_rescaled = f + jnp.exp(0.5 * g0) * eps0
    recon = reconstruction_loss(x if data == "uint8" else f, z0_rescaled, g0, data)

    prior = prior_loss(f, g1)

    # diffusion: 1/2 gamma'(t) ||eps - eps_hat(z_t)||^2
    t = _time_sample(k_t, b, antithetic)
    g_t, dg_t = schedule.value_and_grad(sched_params, t)
    eps = jax.random.normal(k_eps, f.shape, jnp.float32)
    shape = (b,) + (1,) * (f.ndim - 1)
    z_t = jnp.sqrt(jax.nn.sigmoid(-g_t)).reshape(shape) * f + jnp.sqrt(jax.nn.sigmoid(g_t)).reshape(shape) * eps
    time = g_t if time_input == "gamma" else t
    eps_hat = apply_fn(params["model"], z_t, time, cond, train=train, rng=k_model).astype(jnp.float32)
    diffusion = 0.5 * dg_t * _sum_event(jnp.square(eps - eps_hat))
    return VDMTerms(diffusion, prior, recon, g0, g1)


def _bpd_scale(x) -> float:
    return 1.0 / (float(np.prod(jnp.shape(x)[1:])) * math.log(2.0))


def vdm_elbo_loss(apply_fn: Callable, schedule="learned", gamma_min: float = -13.3, gamma_max: float = 5.0,
                  data: str = "uint8", *, time_input: str = "gamma", antithetic: bool = True,
                  n_features: int = 1024) -> Callable:
    """VDM's training loss: `loss_fn(params, batch, rng, train=True) -> (bpd, aux)`.

    params = {'model': ..., 'schedule': ...} (initialise the latter with `loss_fn.schedule.init(key)`);
    batch = {'x': uint8 levels or the pipeline's [-1, 1] floats (data='uint8'), or floats
    (data='continuous'), optional 'cond'}. bpd = mean_B(L_diff + L_prior + L_recon) / (D ln 2);
    aux: 'bpd', 'bpd_diff', 'bpd_prior', 'bpd_recon' (batch means), 'gamma_0', 'gamma_1', 'var_0',
    'var_1' (sigma^2 at t = 0, 1) and 'per_example': the three terms per example in bits/dim.
    """
    sched = as_schedule(schedule, gamma_min, gamma_max, n_features)
    _check("data", data, DATA)
    _check("time_input", time_input, TIME_INPUTS)

    def loss_fn(params, batch, rng, train: bool = True):
        x = batch["x"]
        terms = vdm_terms(apply_fn, sched, params, x, rng, data=data, cond=batch.get("cond"), train=train,
                          time_input=time_input, antithetic=antithetic)
        scale = _bpd_scale(x)
        per = {"diff": terms.diffusion * scale, "prior": terms.prior * scale, "recon": terms.recon * scale}
        means = {k: jnp.mean(v) for k, v in per.items()}
        bpd = means["diff"] + means["prior"] + means["recon"]
        aux = {"bpd": bpd, "bpd_diff": means["diff"], "bpd_prior": means["prior"], "bpd_recon": means["recon"],
               "gamma_0": terms.gamma_0, "gamma_1": terms.gamma_1, "var_0": jax.nn.sigmoid(terms.gamma_0),
               "var_1": jax.nn.sigmoid(terms.gamma_1), "per_example": per}
        return bpd, aux

    loss_fn.schedule = sched
    return loss_fn


class ELBOOutput(NamedTuple):
    """Per-example (B,) negative ELBO in bits/dim and its three terms, averaged over num_samples draws."""

    bpd: Array
    bpd_diff: Array
    bpd_prior: Array
    bpd_recon: Array


def elbo_bpd(apply_fn: Callable, params, batch, rng, *, schedule="learned", gamma_min: float = -13.3,
             gamma_max: float = 5.0, data: str = "uint8", time_input: str = "gamma", antithetic: bool = True,
             n_features: int = 1024, num_samples: int = 1) -> ELBOOutput:
    """Evaluation: bpd = (L_diff + L_prior + L_recon) / (D ln 2) per example (an upper bound on the
    data's -log2 p per dim), averaged over num_samples independent draws of (eps_0, t, eps), draw i
    using fold_in(rng, i); the model runs with train=False. Jittable."""
    sched = as_schedule(schedule, gamma_min, gamma_max, n_features)
    x = batch["x"]
    scale = _bpd_scale(x)

    def one(i):
        terms = vdm_terms(apply_fn, sched, params, x, jax.random.fold_in(rng, i), data=data,
                          cond=batch.get("cond"), train=False, time_input=time_input, antithetic=antithetic)
        return jnp.stack([terms.diffusion, terms.prior, terms.recon]) * scale

    d, p, r = jnp.mean(jax.lax.map(one, jnp.arange(int(num_samples))), axis=0)
    return ELBOOutput(d + p + r, d, p, r)


__all__ = [
    "DATA", "ELBOOutput", "NoiseSchedule", "SCHEDULES", "TIME_INPUTS", "VDMTerms", "VOCAB_SIZE",
    "as_schedule", "decoder_logprobs", "elbo_bpd", "encode_levels", "prior_loss", "reconstruction_loss",
    "vdm_elbo_loss", "vdm_terms",
]
