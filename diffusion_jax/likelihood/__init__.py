"""Likelihoods of diffusion models: exact log p(x) through the probability-flow ODE (with exact or
Hutchinson divergence) and bits/dim of 8-bit images with uniform dequantisation. The VDM
continuous-time ELBO lives with the training objectives, in `diffusion_jax.objectives.vdm`.

    where          what
    pf_ode.py      pf_ode_log_likelihood, the PF-ODE velocity, exact / Hutchinson divergences
    cld.py         phase-space PF-ODE likelihood of CLD and the paper's bound on log p(x0)
    bpd.py         dequantize, bits_per_dim (with the log(2/256) per-dim offset), image_bpd
    diffusion_classifier.py  zero-shot classification by the per-class ELBO (Li et al. 2023)
"""
from diffusion_jax.likelihood.cld import cld_likelihood_bound, cld_log_likelihood
from diffusion_jax.likelihood.diffusion_classifier import WEIGHTINGS, class_errors, diffusion_classify
from diffusion_jax.likelihood.bpd import BPDOutput, as_levels, bits_per_dim, dequantize, image_bpd
from diffusion_jax.likelihood.pf_ode import (
    DIVERGENCES, PROBES, SOLVERS, TIME_VARIABLES, LikelihoodOutput, draw_probes, exact_divergence,
    hutchinson_divergence, pf_ode_log_likelihood, pf_ode_velocity,
)

__all__ = [
    "BPDOutput", "DIVERGENCES", "LikelihoodOutput", "PROBES", "SOLVERS", "TIME_VARIABLES", "as_levels",
    "bits_per_dim", "dequantize", "draw_probes", "exact_divergence", "hutchinson_divergence", "image_bpd",
    "pf_ode_log_likelihood", "pf_ode_velocity", "cld_log_likelihood", "cld_likelihood_bound", "WEIGHTINGS", "class_errors", "diffusion_classify",
]
