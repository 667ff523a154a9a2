"""Diffusion autoencoders: DiffAE (Preechakul et al. 2022) and DMZ (Proszewska et al. 2025).

An encoder maps x0 to a latent z; a z-conditioned denoiser eps(x_t, t, z) is trained with any of the
library's objectives, the encoder only through z. Reconstruct from (z, x_T = DDIM^{-1}(x0 | z)),
generate from (z, fresh noise), interpolate linearly in z and spherically in x_T.

    module = make_diffae(ch=64, ch_mult=(1, 2, 2), z_dim=512)        # or make_dmz(bits=16)
    variables = init_autoencoder(module, key, (32, 32, 3))
    loss_fn = autoencoder_loss(module, get_process('ddpm'))           # stateful-loss protocol
    model_state = init_model_state(module, variables, loss_fn)        # {'encoder', 'objective'}
    ...train...
    lat, _ = encode_fn(module)(variables, x0)                        # LatentOutput (z, ...)
    eps_fn = decoder_eps_fn(module)                                  # params travel in cond: compiles once
    x_T = stochastic_encode(eps_fn, process, x0, lat.z, num_steps=100, params=variables['params'])
    x0_rec = reconstruct(eps_fn, process, lat.z, x_T, num_steps=100, params=variables['params'])
    stats = recompute_batch_stats(module, ema_variables, x_train)    # BatchNorm statistics for EMA weights

    where              what
    encoders.py        SemanticEncoder (DiffAE half UNet + mean or flatten pooling), ConvEncoder (DMZ),
                       LatentHead: 'continuous' | 'gaussian' | 'binary' (Gumbel-softmax bits)
    latents.py         gumbel_softmax (straight-through hard codes), binary codes <-> bits, Bernoulli
                       prior, bit frequencies, Gaussian / binary KL, LatentStats + z normalisation
    model.py           DiffusionAutoencoder (encode / decode), make_diffae, make_dmz, init_autoencoder,
                       encode_fn, decoder_apply_fn, decoder_eps_fn (pure, jittable helpers),
                       recompute_batch_stats (precise BatchNorm statistics for other weights, e.g. EMA)
    objective.py       autoencoder_loss (any base objective + kl_weight KL + bit_usage_weight U; BatchNorm
                       statistics and the base loss's state as model_state), init_model_state, bit_usage
    diagnostics.py     z_dependence (how much eps_hat moves with z, per t), code_usage (dead bits),
                       mutual_information (I(x; z) of a stochastic encoder)           [separate module]
    inference.py       stochastic_encode (DDIM inversion), reconstruct, reconstruct_from_noise, slerp,
                       interpolate, clipped_eps_fn (x0 clipping in both directions)
    latent_sampler.py  the latent DDIM on normalised z (DiffAE's MLP with skips)    [separate module]
    manipulation.py    attribute manipulation with a linear classifier on normalised z  [separate module]
"""
from diffusion_jax.autoencoders.encoders import ENCODERS, NORMS, POOLS, ConvEncoder, LatentHead, SemanticEncoder
from diffusion_jax.autoencoders.inference import (clipped_eps_fn, interpolate, reconstruct,
                                                  reconstruct_from_noise, slerp, stochastic_encode)
from diffusion_jax.autoencoders.latents import (LATENT_TYPES, LatentOutput, LatentStats, binary_code,
                                                binary_kl, bit_entropy, bit_frequencies, bits_from_code,
                                                check_latent_type, denormalize, fit_latent_stats, gaussian_kl,
                                                gumbel_softmax, latent_width, normalize, sample_binary_prior)
from diffusion_jax.autoencoders.model import (DiffusionAutoencoder, check_z_conditioning, decoder_apply_fn,
                                              decoder_eps_fn, encode_fn, has_batch_stats, init_autoencoder,
                                              make_diffae, make_dmz, recompute_batch_stats)
from diffusion_jax.autoencoders.latent_sampler import (LATENT_LOSSES, LatentSampler, LatentSamplerConfig,
                                                       latent_eps_loss, train_latent_sampler)
from diffusion_jax.autoencoders.manipulation import (CLASSIFIERS, LinearClassifier, attribute_direction,
                                                     fit_linear_classifier, manipulate)
from diffusion_jax.autoencoders.objective import autoencoder_loss, bit_usage, init_model_state, latent_statistics
from diffusion_jax.autoencoders import diagnostics

__all__ = [
    "ENCODERS", "NORMS", "POOLS", "ConvEncoder", "LatentHead", "SemanticEncoder", "clipped_eps_fn", "interpolate",
    "reconstruct", "reconstruct_from_noise", "slerp", "stochastic_encode", "LATENT_TYPES", "LatentOutput",
    "LatentStats", "binary_code", "binary_kl", "bit_entropy", "bit_frequencies", "bits_from_code", "check_latent_type",
    "denormalize", "fit_latent_stats", "gaussian_kl", "gumbel_softmax", "latent_width", "normalize",
    "sample_binary_prior", "DiffusionAutoencoder", "check_z_conditioning", "decoder_apply_fn", "decoder_eps_fn",
    "encode_fn", "has_batch_stats", "init_autoencoder", "make_diffae", "make_dmz", "autoencoder_loss",
    "init_model_state", "latent_statistics", "LATENT_LOSSES", "LatentSampler", "LatentSamplerConfig",
    "latent_eps_loss", "train_latent_sampler", "CLASSIFIERS", "LinearClassifier", "attribute_direction",
    "fit_linear_classifier", "manipulate", "recompute_batch_stats", "bit_usage", "diagnostics",
]
