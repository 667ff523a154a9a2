"""Loss weights lambda(t) and how one parameterisation's squared error maps to another's.

With x = alpha x0 + sigma eps and a network whose prediction implies eps_hat, the squared errors of
the four parameterisations are fixed multiples of the eps error (per example, same draw):

    ||x0 - x0_hat||^2       = (sigma^2/alpha^2) ||eps - eps_hat||^2  = ||eps - eps_hat||^2 / SNR
    ||v - v_hat||^2         = ((alpha^2 + sigma^2)^2 / alpha^2) ||eps - eps_hat||^2
    ||score - score_hat||^2 = ||eps - eps_hat||^2 / sigma^2
    ||u - u_hat||^2         = (D^2 / alpha^2) ||eps - eps_hat||^2,  D = alpha sigma' - sigma alpha'
                              (flow velocity u = alpha' x0 + sigma' eps; 1/(1 - t)^2 on the linear path)

(`eps_factor`). Weightings, by parameterisation:

  'none'        1
  'snr'         SNR = alpha^2/sigma^2                    (x0; equals the unweighted eps loss)
  'min_snr'     Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma)/SNR in eps space, i.e.
                  eps  min(SNR, gamma)/SNR,   x0  min(SNR, gamma),
                  v    min(SNR, gamma)/SNR * alpha^2/(alpha^2 + sigma^2)^2
                       (= min(SNR, gamma)/(SNR + 1) for variance-preserving processes, the paper's form),
                  score min(SNR, gamma)/SNR * sigma^2,   flow min(SNR, gamma)/SNR * alpha^2/D^2
  'sigma2'      sigma^2     (score; score_sde's default, equals the unweighted eps loss)
  'likelihood'  g(t)^2      (score; Song et al. 2021, the ELBO weighting)
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time
from diffusion_jax.processes.predictions import flow_rates
from diffusion_jax.objectives.time_sampling import check_option

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
WEIGHTINGS = {
    "eps": ("none", "min_snr"),
    "x0": ("none", "snr", "min_snr"),
    "v": ("none", "min_snr"),
    "score": ("sigma2", "likelihood", "none", "min_snr"),
    "flow": ("none", "min_snr"),
}


def snr(process: Process, t):
    """SNR(t) = alpha^2 / sigma^2 = exp(lambda(t))."""
    return jnp.exp(process.log_snr(as_time(t)))


def eps_factor(process: Process, t, prediction: str):
    """c(t) with ||pred - pred_hat||^2 = c(t) ||eps - eps_hat||^2 for the prediction type."""
    check_option("prediction", prediction, PREDICTIONS)
    t = as_time(t)
    if prediction == "eps":
        return jnp.ones_like(t)
    if prediction == "x0":
        return jnp.exp(-process.log_snr(t))
    a2, s2 = process.alpha(t) ** 2, process.sigma(t) ** 2
    if prediction == "v":
        return (a2 + s2) ** 2 / a2
    if prediction == "flow":
        a, _, _, _, det = flow_rates(process, t, t)
        return (det / a) ** 2
    return 1.0 / s2


def min_snr_weight(process: Process, t, gamma: float = 5.0, prediction: str = "eps"):
    """Min-SNR-gamma weight for the prediction type: min(SNR, gamma)/SNR / eps_factor."""
    check_option("prediction", prediction, PREDICTIONS)
    t = as_time(t)
    if prediction == "x0":
        return jnp.minimum(snr(process, t), gamma)
    eps_w = jnp.minimum(1.0, gamma * jnp.exp(-process.log_snr(t)))
    return eps_w if prediction == "eps" else eps_w / eps_factor(process, t, prediction)


def loss_weight(process: Process, t, weighting: str, prediction: str, *, min_snr_gamma: float = 5.0):
    """lambda(t) (B,) for a weighting name valid for the prediction type (see WEIGHTINGS)."""
    check_option("prediction", prediction, PREDICTIONS)
    check_option(f"weighting for {prediction!r} prediction", weighting, WEIGHTINGS[prediction])
    t = as_time(t)
    if weighting == "none":
        return jnp.ones_like(t)
    if weighting == "snr":
        return snr(process, t)
    if weighting == "min_snr":
        return min_snr_weight(process, t, min_snr_gamma, prediction)
    if weighting == "sigma2":
        return process.sigma(t) ** 2
    return process.g2(t)
