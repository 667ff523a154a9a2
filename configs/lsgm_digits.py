"""LSGM (Vahdat, Kreis & Kautz 2021) on the embedded digits (issue 15): model.family='lsgm'.

    python -m diffusion_jax --config=configs/lsgm_digits.py --workdir=runs/lsgm_digits

VAE: networks.AutoencoderKL (levels (32, 64), 1 res block per level, no mid attention) 16x16x1 ->
8x8x2 latents (f = 2), a discretised-Gaussian decoder with a learned scalar std (init 0.1). Prior:
the embedded default's UNet (ch 32, ch_mult (1, 2), 1 res block, attention at 4x4, AdaGN) on the
latents with the mixed score (one mixing logit per latent channel, init -3 as the official code), on
the paper's VP SDE (beta 0.1 .. 20, time_eps t_min = 0.01). 1 500 steps of batch 32: the first 300
train the VAE alone with a N(0, I) prior (the paper pre-trains its VAE), then each step updates the
VAE on its negative ELBO with the cross entropy through the prior (likelihood importance-sampled t)
and then the prior on the detached latents with the re-weighted 'eps' objective (the paper's
CIFAR-10 choice). Sampling: DDIM (the PF-ODE's first-order solver) 50 steps on the latents, then the
decoder's mean.

Not a paper configuration: sizes and learning rates (1e-3 for both groups instead of 1e-4) are chosen
for a few minutes on 2 CPU cores; see configs/lsgm_cifar10.py for the paper's.
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="vp", objective="eps")
    config.model.family = "lsgm"

    data = config.data
    data.name = "digits/16"
    data.image_size = 16
    data.batch_size = 32
    data.random_flip = False

    ls = config.lsgm
    ls.vae_channels = (32, 64)
    ls.vae_layers_per_block = 1
    ls.latent_channels = 2
    ls.vae_norm_groups = 8
    ls.vae_mid_attention = False
    ls.decoder_std = 0.1
    ls.learn_decoder_std = True
    ls.kl_weight = 1.0
    ls.mixing_logit_init = -3.0
    ls.time_sampling_q = "importance"
    ls.prior_weighting = "eps"
    ls.vae_lr = 1e-3
    ls.prior_lr = 1e-3
    ls.vae_adam_eps = 1e-3
    ls.prior_adam_eps = 1e-4
    ls.vae_end_lr_factor = 0.1
    ls.warmup_vae_steps = 300

    model = config.model
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.scale_shift_norm = True

    config.process.kwargs.t_min = 0.01           # the paper's time_eps

    optim = config.optim
    optim.learning_rate = 1e-3                    # unused: lsgm.vae_lr / prior_lr per group
    optim.warmup_steps = 100
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.1                     # the prior's; the VAE's is lsgm.vae_end_lr_factor
    optim.grad_clip = 1.0
    optim.weight_decay = 0.0
    config.ema.decays = (0.999,)
    config.ema.warmup = True

    train = config.train
    train.num_steps = 1500
    train.log_every = 25
    train.sample_every = 750
    train.checkpoint_every = 250
    train.keep = 2
    train.seed = 0

    sample = config.sample
    sample.sampler = "ddim"
    sample.num_steps = 50
    sample.num_samples = 64
    sample.batch_size = 64

    config.report.probe = False        # the readout sweep noises images; the prior reads latents
    config.eval.num_batches = 0
    return config
