"""Latent diffusion (LDM, Rombach et al. 2022) on the embedded digits (issue 15): model.family='latent'.

    python -m diffusion_jax --config=configs/ldm_digits.py --workdir=runs/ldm_digits

First stage: a KL autoencoder (networks.AutoencoderKL, levels (32, 64), 1 res block per level, no
mid attention, 2 latent channels) 16x16x1 -> 8x8x2 (f = 2), trained for the first 600 of 1 500 steps
with the perceptual-free LDM loss (L1 + 1e-6 KL; no LPIPS, no patch GAN). Then it is frozen, the
latent scale s = 1 / std of the first batch of latents (LDM's scale_by_std), and the embedded
default's denoiser (UNet ch 32, ch_mult (1, 2), 1 res block, attention at 4x4 (the latent's 8x8 / 2),
AdaGN; cosine process, v prediction, uniform t) trains on s z for the remaining 900 steps. Sampling:
DDIM 50 steps on the latents, then decode(z / s).

Not a paper configuration: sizes and rates are chosen for speed (LDM-4 is f = 4, 3 latent
channels, VQ-reg or KL 1e-6 with LPIPS + patch GAN, a 400M UNet).
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cosine", objective="v")
    config.model.family = "latent"

    data = config.data
    data.name = "digits/16"
    data.image_size = 16
    data.batch_size = 32
    data.random_flip = False

    fs = config.first_stage
    fs.block_out_channels = (32, 64)
    fs.layers_per_block = 1
    fs.latent_channels = 2
    fs.norm_num_groups = 8
    fs.mid_attention = False
    fs.kl_weight = 1e-6
    fs.reconstruction = "l1"
    fs.steps = 600
    fs.scale_factor = None

    model = config.model
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.scale_shift_norm = True

    config.process.kwargs.s = 0.008
    config.objective.kwargs.weighting = "none"
    config.objective.kwargs.time_sampling = "uniform"

    optim = config.optim
    optim.learning_rate = 1e-3
    optim.warmup_steps = 100
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.1
    optim.grad_clip = 1.0
    optim.weight_decay = 0.0           # the frozen first stage must not shrink (see models/latent.py)
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

    config.report.probe = False        # the readout sweep noises images; this denoiser reads latents
    config.eval.num_batches = 0
    return config
