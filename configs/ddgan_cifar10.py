"""Denoising diffusion GAN on CIFAR-10, T = 4 (Xiao, Kreis & Vahdat, "Tackling the Generative Learning
Trilemma with Denoising Diffusion GANs", ICLR 2022; NVlabs/denoising-diffusion-gan, the README's
CIFAR-10 command). The paper reports FID 3.75, IS 9.63 at NFE 4 (shared/reference/baselines.md).

    python -m diffusion_jax --config=configs/ddgan_cifar10.py --workdir=runs/ddgan_cifar10

Official command: --num_channels_dae 128 --ch_mult 1 2 2 2 --num_res_blocks 2 --num_timesteps 4
--nz 100 --z_emb_dim 256 --n_mlp 4 --ngf 64 --embedding_type positional --use_ema --ema_decay 0.9999
--r1_gamma 0.02 --lr_d 1.25e-4 --lr_g 1.6e-4 --lazy_reg 15 --batch_size 64 (x 4 GPUs = 256)
--num_epoch 1800; defaults beta_min 0.1, beta_max 20, beta1 0.5, beta2 0.9, t_emb_dim 256, dropout 0,
attention at 16, BigGAN resblocks, skip_rescale, tanh output, random flips.

    steps      1800 epochs x floor(50 000 / 256) = 351 000 train steps
    lr decay   the official cosine annealing (per epoch, to 1e-5) as config.optim's cosine schedule to
               end_lr_factor 1e-5 / lr_g = 0.0625 for both networks (the official D ends at 1e-5 /
               1.25e-4 = 0.08); no warm-up, no clipping, no weight decay
    critic     ngf 64, down blocks of 256, 512, 512 channels (32 -> 16 -> 8 -> 4), time embedding 256
               (the official Discriminator_small starts with two full-resolution blocks of 128)

Differences from the official model, as far as the library's UNet expresses it: no FIR (1, 3, 3, 1)
resampling, no progressive input (residual), AdaGN on one GroupNorm per ResBlock (see
models/ddgan.py).
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="vp", objective="eps")   # process unused
    config.model.family = "ddgan"

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 256
    data.random_flip = True

    model = config.model
    model.ch = 128                      # num_channels_dae
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.0
    model.resblock_updown = True        # resblock_type 'biggan'
    model.skip_rescale = True
    model.time_embedding = "sinusoidal"  # embedding_type 'positional' of the integer step
    model.time_scale = 1.0

    d = config.ddgan
    d.num_timesteps = 4
    d.beta_min, d.beta_max = 0.1, 20.0
    d.use_geometric = False
    d.nz = 100
    d.z_emb_dim = 256
    d.n_mlp = 4
    d.use_tanh = True
    d.ngf = 64
    d.disc_ch_mult = (4, 8, 8)
    d.t_emb_dim = 256
    d.lr_g, d.lr_d = 1.6e-4, 1.25e-4
    d.beta1, d.beta2 = 0.5, 0.9
    d.r1_gamma = 0.02
    d.lazy_reg = 15

    optim = config.optim
    optim.warmup_steps = 0
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.0625
    optim.grad_clip = 0.0
    optim.weight_decay = 0.0
    config.ema.decays = (0.9999,)
    config.ema.warmup = False

    train = config.train
    train.num_steps = 1800 * (50000 // 256)
    train.log_every = 100
    train.sample_every = 10000
    train.checkpoint_every = 10000
    train.seed = 0

    sample = config.sample
    sample.num_samples = 64
    sample.batch_size = 256

    config.report.probe = False         # no scalar eps
    config.eval.num_batches = 0
    return config
