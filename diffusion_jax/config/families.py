"""The config sections of the model families beyond a plain pixel diffusion model (`models/`): the
diffusion autoencoders (DiffAE / DMZ) and DiffAE's latent sampler, latent diffusion's first stage, DiVAE's
VQ-VAE, LSGM, the denoising diffusion GAN, CLD's phase-space samplers, and REPA's alignment term."""
from __future__ import annotations

from diffusion_jax.config.fields import Field, _cld_option, _cld_samplers, _non_negative, _positive, _unit


# model.family='cld': the phase-space samplers (sampling/cld.py)
CLD: dict[str, Field] = {
    "sampler": Field(str, "sscs", choices=_cld_samplers,
                     doc="'sscs' (symmetric splitting, the paper's), 'em' (Euler-Maruyama) or 'ode' "
                         "(the probability-flow ODE, fixed steps); sample.num_steps steps, a final "
                         "denoising step when sample.denoise_final; config.sample.sampler is unused"),
    "striding": Field(str, "linear", choices=_cld_option("STRIDINGS"),
                      doc="time grid: 'linear' or the official 'quadratic' (fine steps near t = 0)"),
    "ode_solver": Field(str, "heun", choices=_cld_option("PF_SOLVERS"), doc="sampler 'ode'"),
    "score_time": Field(str, "mid", choices=_cld_option("SCORE_TIMES"),
                        doc="sampler 'sscs': score at the step midpoint, or its start (official)"),
}


AUTOENCODER_KINDS = ("none", "diffae", "dmz")
ENCODER_TYPES = ("semantic", "conv")
LATENT_TYPES = ("continuous", "gaussian", "binary")


def _z_modes_check(v):
    from diffusion_jax.networks.unet import Z_MODES  # pylint: disable=import-outside-toplevel
    bad = [m for m in v if m not in Z_MODES]
    if bad:
        return f"unknown z-conditioning modes {bad}; valid: {Z_MODES}"
    if not v:
        return "needs at least one mode"
    return None


AUTOENCODER: dict[str, Field] = {
    "kind": Field(str, "none", choices=AUTOENCODER_KINDS,
                  doc="'none': a plain diffusion model; 'diffae' / 'dmz': a diffusion "
                      "autoencoder whose decoder is config.model (a UNet)"),
    "encoder": Field(str, None, optional=True, choices=ENCODER_TYPES,
                     doc="'semantic' (half-UNet + pooling) | 'conv' (DMZ); None: the kind's"),
    "latent": Field(str, None, optional=True, choices=LATENT_TYPES,
                    doc="'continuous' | 'gaussian' | 'binary'; None: the kind's"),
    "z_dim": Field(int, None, optional=True, check=_positive,
                   doc="latent size (binary: number of bits); None: 512 diffae, 16 dmz"),
    "z_conditioning": Field(tuple, None, optional=True, item=str, check=_z_modes_check,
                            doc="subset of networks.Z_MODES; None: the kind's"),
    "encoder_ch": Field(int, None, optional=True, check=_positive, doc="None: model.ch"),
    "encoder_ch_mult": Field(tuple, None, optional=True, item=int,
                             doc="semantic encoder levels; None: model.ch_mult"),
    "encoder_num_res_blocks": Field(int, None, optional=True, check=_positive,
                                    doc="None: model.num_res_blocks"),
    "encoder_attn_resolutions": Field(tuple, None, optional=True, item=int,
                                      doc="None: model.attn_resolutions"),
    "norm": Field(str, "batch", choices=("batch", "group"), doc="conv encoder's norm"),
    "pool": Field(str, "mean", choices=("mean", "flatten"),
                  doc="semantic encoder: global average pooling (DiffAE) or flatten (keeps the layout)"),
    "kl_weight": Field(float, 0.0, check=_non_negative,
                       doc="per-example KL to the prior (gaussian: N(0, I); binary: Bernoulli(1/2))"),
    "bit_usage_weight": Field(float, 0.0, check=_non_negative,
                              doc="binary: batch-level KL of each bit's mean posterior to Bernoulli(1/2)"),
    "straight_through": Field(bool, False, doc="binary: hard Gumbel samples with straight-through "
                                               "gradients in training (else soft codes)"),
    "tau": Field(float, 1.0, check=_positive, doc="Gumbel-softmax temperature (the start of a schedule)"),
    "tau_final": Field(float, None, optional=True, check=_positive,
                       doc="binary: anneal tau exponentially to this value over tau_anneal_steps; "
                           "None: constant tau"),
    "tau_anneal_steps": Field(int, 0, check=_non_negative, doc="steps of the tau schedule"),
    "prior": Field(str, "bernoulli", choices=("bernoulli", "empirical"),
                   doc="binary latents for generation: Bernoulli(0.5) or per-bit frequencies"),
}


# model.family='latent' (LDM): the KL autoencoder of the latents
FIRST_STAGE: dict[str, Field] = {
    "block_out_channels": Field(tuple, (32, 64), item=int,
                                doc="AutoencoderKL levels (image side / latent side = 2^(levels - 1))"),
    "layers_per_block": Field(int, 1, check=_positive),
    "latent_channels": Field(int, 4, check=_positive),
    "norm_num_groups": Field(int, 8, check=_positive, doc="divides every block_out_channels"),
    "mid_attention": Field(bool, False, doc="attention in the middle block (LDM: True)"),
    "kl_weight": Field(float, 1e-6, check=_non_negative, doc="LDM's KL-f configs: 1e-6"),
    "reconstruction": Field(str, "l1", choices=("l1", "l2"),
                            doc="per-pixel loss (perceptual-free LDM: no LPIPS, no patch GAN)"),
    "steps": Field(int, 0, check=_non_negative,
                   doc="train steps of the first stage; then it is frozen and the diffusion "
                       "model trains on its scaled latents for the remaining steps"),
    "scale_factor": Field(float, None, optional=True, check=_positive,
                          doc="latent scale; None: 1 / std of the first diffusion-stage batch "
                              "of latents (LDM's scale_by_std)"),
}


# model.family='divae' (Shi et al. 2022): VQ-VAE + diffusion decoder
VQ: dict[str, Field] = {
    "num_codes": Field(int, 64, check=_positive, doc="codebook size K (>= 2)"),
    "code_dim": Field(int, 4, check=_positive, doc="code (embedding) dimension D"),
    "beta": Field(float, 0.25, check=_non_negative, doc="commitment weight (VQ-VAE: 0.25)"),
    "ema_decay": Field(float, 0.99, optional=True,
                       doc="EMA codebook decay (Razavi et al. 2019); None: codebook learned by "
                           "the codebook loss"),
    "dead_after": Field(int, 100, optional=True, check=_positive,
                        doc="EMA: restart a code unused for this many updates from a random "
                            "encoder output of the batch (None: never)"),
    "steps": Field(int, 0, check=_non_negative,
                   doc="train steps of the VQ-VAE (L2 reconstruction by the deterministic "
                       "decoder + commitment); then it is frozen and the diffusion decoder "
                       "trains on (x0, z_q(x0)) for the remaining steps"),
    "block_out_channels": Field(tuple, (32, 64), item=int,
                                doc="encoder / deterministic-decoder levels (image side / code "
                                    "map side = 2^(levels - 1))"),
    "layers_per_block": Field(int, 1, check=_positive),
    "norm_num_groups": Field(int, 8, check=_positive, doc="divides every block_out_channels"),
    "mid_attention": Field(bool, False),
    "decoder_channels": Field(tuple, None, optional=True, item=int,
                              doc="levels of the deterministic decoder (same count as "
                                  "block_out_channels); None: block_out_channels (set it to "
                                  "match the diffusion UNet's size for the comparison)"),
    "conditioning": Field(str, "concat", choices=("concat", "concat+time"),
                          doc="how the diffusion UNet sees z_q: nearest-upsampled to the image "
                              "size and concatenated to x_t; '+time' also adds W mean(z_q) "
                              "to the time embedding"),
}


# model.family='lsgm' (Vahdat et al. 2021): VAE + score prior
LSGM: dict[str, Field] = {
    "vae_channels": Field(tuple, (32, 64), item=int,
                          doc="AutoencoderKL levels of the VAE (image side / latent side = "
                              "2^(levels - 1))"),
    "vae_layers_per_block": Field(int, 1, check=_positive),
    "latent_channels": Field(int, 2, check=_positive),
    "vae_norm_groups": Field(int, 8, check=_positive, doc="divides every vae_channels"),
    "vae_mid_attention": Field(bool, False),
    "decoder_std": Field(float, 0.1, check=_positive,
                         doc="initial std of the discretised-Gaussian decoder p(x|z) (one "
                             "scalar, learned when learn_decoder_std)"),
    "learn_decoder_std": Field(bool, True),
    "kl_weight": Field(float, 1.0, check=_non_negative,
                       doc="weight of log q(z|x) + CE(q || p) in the VAE loss (1: the ELBO; "
                           "LSGM's kl_coeff)"),
    "mixing_logit_init": Field(float, -3.0,
                               doc="initial mixing logit per latent channel (official: -3; "
                                   "MNIST / Omniglot -6)"),
    "time_sampling_q": Field(str, "importance", choices=("importance", "uniform"),
                             doc="t of the VAE's cross entropy: likelihood importance sampling "
                                 "(ll_iw) or uniform (ll_uniform)"),
    "prior_weighting": Field(str, "eps", choices=("eps", "likelihood"),
                             doc="the prior's loss: 'eps' ||eps - eps_theta||^2, t ~ U (the "
                                 "paper's re-weighted drop_all objective) or 'likelihood' "
                                 "(the CE estimate, ll_iw)"),
    "vae_lr": Field(float, 1e-4, check=_positive, doc="official learning_rate_vae"),
    "prior_lr": Field(float, 1e-4, check=_positive, doc="official learning_rate_dae"),
    "vae_adam_eps": Field(float, 1e-3, check=_positive, doc="official VAE Adam eps"),
    "prior_adam_eps": Field(float, 1e-4, check=_positive, doc="official prior Adam eps"),
    "vae_end_lr_factor": Field(float, 0.1, check=_non_negative,
                               doc="cosine schedule's end (official 1e-5 / 1e-4); the prior "
                                   "uses optim.end_lr_factor"),
    "warmup_vae_steps": Field(int, 0, check=_non_negative,
                              doc="first steps train the VAE alone with a N(0, I) prior (the "
                                  "paper pre-trains the VAE); the prior gets no update"),
}


# model.family='ddgan' (denoising diffusion GAN); official names
DDGAN: dict[str, Field] = {
    "num_timesteps": Field(int, 4, check=_positive, doc="T: generator steps (NFE) of the chain"),
    "beta_min": Field(float, 0.1, check=_positive),
    "beta_max": Field(float, 20.0, check=_positive, doc="VP-SDE betas of the T-step schedule"),
    "use_geometric": Field(bool, False, doc="geometric variance schedule instead of the VP one"),
    "nz": Field(int, 100, check=_positive, doc="latent z ~ N(0, I_nz) of the generator"),
    "z_emb_dim": Field(int, 256, check=_positive, doc="width of the mapping network w(z)"),
    "n_mlp": Field(int, 4, check=_non_negative, doc="hidden layers of the mapping network"),
    "use_tanh": Field(bool, True, doc="x0' = tanh(UNet) (official: not not_use_tanh)"),
    "ngf": Field(int, 64, check=_positive, doc="discriminator base channels"),
    "disc_ch_mult": Field(tuple, (4, 8, 8), item=int,
                          doc="discriminator down blocks, ngf * m channels each (each halves H)"),
    "t_emb_dim": Field(int, 256, check=_positive, doc="discriminator time embedding"),
    "lr_g": Field(float, 1.6e-4, check=_positive, doc="generator Adam lr (config.optim's "
                                                      "schedule, warm-up, clip, eps apply)"),
    "lr_d": Field(float, 1.25e-4, check=_positive, doc="discriminator Adam lr"),
    "beta1": Field(float, 0.5, check=_unit, doc="Adam b1 of both networks"),
    "beta2": Field(float, 0.9, check=_unit, doc="Adam b2 of both networks"),
    "r1_gamma": Field(float, 0.02, check=_non_negative,
                      doc="R1 on real x_t: r1_gamma / 2 E||grad D||^2"),
    "lazy_reg": Field(int, 15, check=_non_negative,
                      doc="R1 every lazy_reg steps (unscaled, as the official code); 0: every step"),
}


LATENT_SAMPLER: dict[str, Field] = {
    "num_steps": Field(int, 0, check=_non_negative,
                       doc="train steps of DiffAE's latent DDIM after the autoencoder; 0: off"),
    "num_layers": Field(int, 10, check=_positive),
    "hidden": Field(int, 2048, check=_positive),
    "batch_size": Field(int, 512, check=_positive),
    "learning_rate": Field(float, 1e-4, check=_positive),
    "loss": Field(str, "l1", choices=("l1", "l2")),
    "sample_steps": Field(int, 50, check=_positive),
}


# REPA (Yu et al. 2025) while training a 'pixel' UNet
REPA: dict[str, Field] = {
    "weight": Field(float, 0.0, check=_non_negative,
                    doc="lambda of L + lambda (1 - cos(h(f(x_t)), y(x0))) (paper: 0.5); 0: off"),
    "block": Field(str, "", doc="the UNet block aligned (a sown name, e.g. 'down_1_0'); '': the "
                                "first block of the second level (REPA aligns an early block)"),
    "target": Field(str, "", doc="the frozen encoder y: 'run:<workdir>', the (EMA) encoder of a "
                                 "trained autoencoder run (its z); any Flax encoder through "
                                 "readouts.repa_loss"),
    "dim": Field(int, 0, check=_non_negative,
                 doc="the target features' width; 0: read from the target when training starts "
                     "(then saved with the config, so the other modes need no target)"),
    "hidden": Field(int, 0, check=_non_negative, doc="projector MLP width; 0: 4 model.ch"),
}
