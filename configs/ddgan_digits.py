"""Denoising diffusion GAN (DDGAN; Xiao, Kreis & Vahdat, ICLR 2022) on the embedded digits (issue 15):
model.family='ddgan', T = 4 generator steps.

    python -m diffusion_jax --config=configs/ddgan_digits.py --workdir=runs/ddgan_digits

Generator: the embedded default's UNet (ch 32, ch_mult (1, 2), 1 res block, attention at 8x8, no
dropout), additive time embedding of the integer step t (time_scale 1), z ~ N(0, I_100) through a
PixelNorm + 2-layer mapping network (width 128) into every ResBlock by AdaGN, x0' = tanh(UNet).
Discriminator: ngf 32, down blocks of 64 and 128 channels (16 -> 8 -> 4), time embedding 64.
Chain: the paper's VP betas (0.1, 20), T = 4. Loss: non-saturating GAN, R1 gamma 0.02 every 15
steps (lazy, as the paper's CIFAR-10 run). Adam (0.5, 0.9), lr_g 1.6e-4 / lr_d 1.25e-4 raised 4x
(6.4e-4 / 5e-4) for a 1 500-step run, 100 warm-up steps, cosine to 0.1x, no clipping (the paper
clips nothing); batch 32; EMA 0.999 with warm-up (the paper's 0.9999 needs far longer runs).

Not a paper configuration (configs/ddgan_cifar10.py is): sizes and rates are chosen for speed.
No bits/dim and no probe table (no scalar eps; models/ddgan.py).
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="vp", objective="eps")   # process unused
    config.model.family = "ddgan"

    data = config.data
    data.name = "digits/16"
    data.image_size = 16
    data.batch_size = 32
    data.random_flip = False

    model = config.model
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (8,)
    model.dropout = 0.0
    model.time_scale = 1.0             # the integer step t = 0..T-1, as the official embedding

    d = config.ddgan
    d.num_timesteps = 4
    d.beta_min, d.beta_max = 0.1, 20.0
    d.nz = 100
    d.z_emb_dim = 128
    d.n_mlp = 2
    d.ngf = 32
    d.disc_ch_mult = (2, 4)
    d.t_emb_dim = 64
    d.lr_g, d.lr_d = 6.4e-4, 5e-4
    d.beta1, d.beta2 = 0.5, 0.9
    d.r1_gamma = 0.02
    d.lazy_reg = 15

    optim = config.optim
    optim.warmup_steps = 100
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.1
    optim.grad_clip = 0.0
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
    sample.num_samples = 64
    sample.batch_size = 64

    config.report.probe = False        # no scalar eps: the readout sweep does not apply
    config.eval.num_batches = 0
    return config
