"""EDM on CIFAR-10 (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"), unconditional, DDPM++ backbone, EDM preconditioning and loss.

Source: NVlabs/edm `train.py` defaults (--arch ddpmpp: SongUNet, model_channels 128, channel_mult
[2, 2, 2], embedding 'positional', channel_mult_noise 1, resample_filter [1, 1]; --precond edm;
--batch 512, --lr 10e-4 (Adam, betas (0.9, 0.999), eps 1e-8), --ema 0.5 (Mimg half-life),
--dropout 0.13, --duration 200 Mimg, --augment 0.12, --xflip False) and `training/training_loop.py`
(lr_rampup_kimg 10000, ema_rampup_ratio 0.05, loss summed over pixels); SongUNet's defaults
num_blocks 4, attn_resolutions [16], skip_scale sqrt(0.5). EDM (baselines.md): sigma_min 0.002,
sigma_max 80, rho 7, sigma_data 0.5, P_mean -1.2, P_std 1.2; Heun with 18 steps (35 NFE):
FID 1.97 unconditional.

    network   UNet ch 128, ch_mult (2, 2, 2), 4 blocks, attention at 16, BigGAN up/down blocks,
              residual sums / sqrt(2), dropout 0.13: 56.5M parameters ("DDPM++, 56M"); it sees
              c_in x and embeds c_noise = ln(sigma) / 4 as is (time_scale 1)
    process   'edm': t = sigma in [0.002, 80]
    loss      'edm': ln sigma ~ N(-1.2, 1.2^2), weight (s^2 + sd^2) / (s sd)^2, summed over pixels
    optimiser Adam lr 1e-3 with linear warm-up over 10 Mimg = 19531 steps at batch 512, no clip
              (EDM replaces non-finite gradients instead); 200 Mimg = 390625 steps
    EMA       half-life 0.5 Mimg -> per-step decay beta = 0.5 ** (batch / 0.5e6) = 0.99929 at
              batch 512 (`ema.halflife_mimg`; the decay is derived at load time from the batch
              size, so `--config.data.batch_size` keeps the half-life); EDM's ramp-up (half-life
              min(0.5 Mimg, 0.05 * images seen)) is approximated by `ema.warmup`
              (decay min(beta, (1 + n) / (10 + n)))
    sampling  EDM's 18-step Heun sampler, 35 NFE: its 18 Karras noise levels 80 -> 0.002 (rho 7,
              the 'karras' spacing) are a 17-step grid here with a Heun step between each pair,
              and EDM's final Euler step to sigma = 0 equals the x0 prediction at 0.002
              (`sample.denoise_final`), 17 * 2 + 1 = 35 evaluations

Not modelled: EDM's non-leaking augmentation pipeline (--augment 0.12 with augment labels), the
positional embedding's exact frequency layout, the [1, 1] resample filter (conv resampling here).
"""
from diffusion_jax.config import base_config

BATCH = 512
MIMG = 1_000_000


def get_config():
    config = base_config(model_type="unet", process="edm", objective="edm")

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = BATCH
    data.random_flip = False             # --xflip False (augmentation does the flips in EDM)

    model = config.model
    model.ch = 128
    model.ch_mult = (2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.13
    model.time_embedding = "sinusoidal"  # 'positional'
    model.time_scale = 1.0               # the network sees c_noise = ln(sigma) / 4
    model.resblock_updown = True
    model.resample_with_conv = True
    model.skip_rescale = True
    model.scale_shift_norm = False       # adaptive_scale=False for DDPM++

    p = config.process.kwargs
    p.t_min = 0.002                      # sigma_min
    p.t_max = 80.0                       # sigma_max

    o = config.objective.kwargs
    o.sigma_data = 0.5
    o.p_mean = -1.2
    o.p_std = 1.2
    o.reduce = "sum"

    optim = config.optim
    optim.learning_rate = 1e-3
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = round(10 * MIMG / BATCH)     # lr_rampup_kimg 10000 -> 19531
    optim.schedule = "constant"
    optim.grad_clip = 0.0

    config.ema.halflife_mimg = 0.5
    config.ema.decays = ()               # derived: 0.5 ** (batch / 0.5e6)
    config.ema.warmup = True

    train = config.train
    train.num_steps = 200 * MIMG // BATCH            # --duration 200 Mimg -> 390625
    train.log_every = 100
    train.sample_every = 5000
    train.checkpoint_every = 5000                    # ~2.5 Mimg, EDM's snapshot interval
    train.keep = 3
    train.seed = 0

    sample = config.sample
    sample.sampler = "heun"
    sample.num_steps = 17                # 18 Karras sigmas 80 -> 0.002 (rho 7), Heun between
    sample.spacing = "karras"
    sample.denoise_final = True          # EDM's last (Euler) step to sigma = 0 is x0_hat: 35 NFE
    sample.num_samples = 64

    # Bits/dim (eval.bpd): EDM reports none; the PF-ODE density at sigma_min = 0.002, the smallest
    # noise level the model is trained on (below a dequantisation cell, 2/256 wide).
    config.eval.bpd_t_min = 0.002
    return config
