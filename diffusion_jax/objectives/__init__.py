"""Training objectives as pure loss factories: `factory(process, apply_fn, **options)` returns a
jittable `loss_fn(params, batch, rng) -> (loss, aux)` with batch {'x': (B, ...), 'cond': optional}.
A stateful loss (`is_stateful(loss_fn)`, e.g. the loss-aware hybrid loss) is instead
`loss_fn(params, batch, rng, model_state)` and returns the updated state in aux['model_state'];
`loss_fn.init_state()` gives the initial one.

    where               what
    denoising.py        eps / x0 / v / flow-velocity prediction losses, denoising score matching (sigma^2 or
                        likelihood weighting, importance sampling), Min-SNR-gamma weighting
    edm.py              EDM preconditioning, its loss and its eps_fn adapter
    time_sampling.py    uniform / stratified / likelihood-importance / log-normal / SD3's logit-normal
                        and mode / discrete t, and
                        improved DDPM's loss-aware sampler
    hybrid.py           improved DDPM's hybrid loss L_simple + lambda L_vb with a learned variance
                        ([eps, v] outputs), optionally loss-aware t (a stateful loss) and DDPM-IP
    weighting.py        loss weights lambda(t) and the error factors between parameterisations
    vdm.py              the VDM ELBO with a learnable schedule
    reflow.py           the k-rectified-flow loss on coupled (data, noise) pairs (Liu et al. 2023)
    vae.py              diagonal-Gaussian posterior (sample, KL, KL between two), LDM's first-stage loss
                        without LPIPS / GAN, the latent scale factor 1 / std(z)
    lsgm.py             LSGM's mixed score and its cross entropy as likelihood-weighted DSM
                        (importance-sampled t); the prior's update
    ddgan.py            the denoising diffusion GAN's T-step chain and DDPM posterior, non-saturating
                        GAN losses, R1 (generation: sampling/ddgan.py)
(vector quantisation: diffusion_jax.quantization)
"""
from diffusion_jax.objectives.cld import (
    CLD_OBJECTIVES, CLD_WEIGHTINGS, cld_hsm_loss, cld_scales, cld_score_fn, mixed_score_v, network_output_from_score,
)
from diffusion_jax.objectives.denoising import (
    denoising_loss, epsilon_loss, flow_matching_loss, score_matching_loss, split_batch, v_loss, x0_loss,
)
from diffusion_jax.objectives.edm import (
    EDMScalings, edm_eps_fn, edm_loss, edm_loss_weight, edm_precondition, edm_scalings, edm_target,
)
from diffusion_jax.objectives.hybrid import (
    HYBRID_TIME_SAMPLINGS, VBSchedule, approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
    hybrid_loss, hybrid_loss_state, is_stateful, learned_variance_eps_fn, learned_variance_pair_fn, normal_kl,
    split_learned_variance, vb_schedule, vb_timesteps,
)
from diffusion_jax.objectives.time_sampling import (
    MODE_SCALE_RANGE, TIME_SAMPLINGS, LossHistory, TimeSample, bucket_time, check_time_options, edm_sigma_sample,
    history_probs, init_loss_history, logit_normal_time, mode_map, mode_time, likelihood_importance_density, likelihood_importance_time, lognormal_time,
    sample_from_history, sample_time, stratified_time, time_bucket, time_from_index, uniform_time,
    update_history,
)
from diffusion_jax.objectives.reflow import reflow_loss
from diffusion_jax.objectives.vae import DiagonalGaussian, first_stage_loss, latent_scale_factor
from diffusion_jax.objectives.lsgm import (
    cross_entropy_constant, lsgm_cross_entropy, lsgm_prior_loss, mixed_score_eps, normal_prior_eps,
)
from diffusion_jax.objectives.ddgan import (
    DDGANSchedule, ddgan_betas, discriminator_loss, generator_loss, r1_penalty,
)
from diffusion_jax.objectives.vdm import elbo_bpd, vdm_elbo_loss
from diffusion_jax.objectives.weighting import (
    PREDICTIONS, WEIGHTINGS, eps_factor, loss_weight, min_snr_weight, snr,
)

__all__ = [
    "cld_hsm_loss", "cld_score_fn", "cld_scales", "mixed_score_v", "network_output_from_score", "CLD_OBJECTIVES",
    "CLD_WEIGHTINGS",
    "reflow_loss", "denoising_loss", "epsilon_loss", "flow_matching_loss", "logit_normal_time", "mode_time", "mode_map",
    "check_time_options", "MODE_SCALE_RANGE", "x0_loss", "v_loss", "score_matching_loss", "split_batch",
    "EDMScalings", "edm_scalings", "edm_loss_weight", "edm_target", "edm_precondition", "edm_eps_fn",
    "edm_loss", "TIME_SAMPLINGS", "TimeSample", "sample_time", "uniform_time", "stratified_time",
    "likelihood_importance_time", "likelihood_importance_density", "lognormal_time", "edm_sigma_sample",
    "time_from_index", "LossHistory", "init_loss_history", "history_probs", "sample_from_history",
    "update_history", "bucket_time", "time_bucket", "PREDICTIONS", "WEIGHTINGS", "snr", "eps_factor",
    "min_snr_weight", "loss_weight", "vdm_elbo_loss", "elbo_bpd",
    "hybrid_loss", "hybrid_loss_state", "is_stateful", "HYBRID_TIME_SAMPLINGS", "VBSchedule", "vb_schedule",
    "vb_timesteps", "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood",
    "split_learned_variance", "learned_variance_eps_fn", "learned_variance_pair_fn",
    "DiagonalGaussian", "first_stage_loss", "latent_scale_factor", "mixed_score_eps", "normal_prior_eps",
    "cross_entropy_constant", "lsgm_cross_entropy", "lsgm_prior_loss", "DDGANSchedule", "ddgan_betas",
    "discriminator_loss", "generator_loss", "r1_penalty",
]

