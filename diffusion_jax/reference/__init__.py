"""Closed-form reference distributions (Gaussians and Gaussian mixtures under any process) and
distances between sample sets: the ground truth that samplers, objectives and likelihoods are tested
against."""
from diffusion_jax.reference import cld_mixtures, metrics, mixtures
from diffusion_jax.reference.metrics import energy_distance, mixture_fit, sliced_wasserstein
from diffusion_jax.reference.mixtures import (
    GaussianMixture, gaussian, make_mixture, random_mixture, ring_mixture,
)

__all__ = ["cld_mixtures", "mixtures", "metrics", "GaussianMixture", "gaussian", "make_mixture", "random_mixture",
           "ring_mixture", "energy_distance", "mixture_fit", "sliced_wasserstein"]
