"""Critically-damped Langevin diffusion on CIFAR-10 (Dockhorn, Vahdat & Kreis, "Score-Based Generative
Modeling with Critically-Damped Langevin Diffusion", ICLR 2022; nv-tlabs/CLD-SGM configs/default_cifar10.txt
and specific_cifar10.txt). The paper reports FID 2.25 (see shared/reference/baselines.md).

    python -m diffusion_jax --config=configs/cld_cifar10.py --workdir=runs/cld_cifar10

Process 'cld': m_inv 4 (M = 0.25, Gamma = 1), gamma 0.04, beta0 4, beta1 0 (a constant beta = 4; beta1 is
a slope in the official code), sampling_eps 1e-3 (t_min), t_max 1. Objective 'cld_hsm': hybrid score
matching, weighting 'eps' (reweightedv2), mixed score, loss_eps 1e-5.
Network: NCSN++ with 128 channels, ch_mult (1, 2, 2, 2), 8 residual blocks per level, attention at
16x16, BigGAN resblocks (resblock_updown), skip_rescale, dropout 0.1, on concat(x, v) (6 -> 3 channels).
Optimisation: Adam lr 2e-4, grad clip 1, 100 000 warm-up iterations, 800 000 iterations, EMA 0.9999,
batch 128 (2 x 8 GPUs; the README's one-GPU setting is 64). Sampling: SSCS (sampler 'sscs', the
paper's fast sampler) on the quadratic grid with the final denoising step; config.cld.sampler='ode'
is the probability-flow ODE (here fixed-step Heun; the paper's is RK45 with rtol = atol = 1e-5).

Differences from the official model, as far as the library's UNet expresses it: no FIR (1, 3, 3, 1)
resampling, no progressive input / combine, init_scale 0 not applied. The time embedding is the
official one: Gaussian Fourier features (scale 16) of log t (model.time_input = 'log'). The
likelihood (likelihood_eps 1e-5, Hutchinson with Rademacher probes) is
`likelihood.cld_likelihood_bound`: --mode=eval with --config.eval.bpd=True.
"""
from ml_collections import config_dict

from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cld", objective="cld_hsm")
    config.model.family = "cld"

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 128
    data.random_flip = True

    model = config.model
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 8
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resblock_updown = True         # resblock_type 'biggan'
    model.skip_rescale = True
    model.time_embedding = "fourier"     # official: Fourier features of log t
    model.time_input = "log"
    model.fourier_scale = 16.0
    model.time_scale = 1.0

    p = config.process.kwargs
    p.m_inv = 4.0
    p.gamma = 0.04
    p.beta0 = 4.0
    p.beta1 = 0.0
    p.damping = config_dict.placeholder(float)   # None: critical, Gamma = 2 sqrt(M)
    p.t_min = 1e-3                       # sampling_eps
    p.t_max = 1.0
    o = config.objective.kwargs
    o.objective = "hsm"
    o.weighting = "eps"                  # reweightedv2
    o.mixed_score = True
    o.loss_eps = 1e-5

    optim = config.optim
    optim.learning_rate = 2e-4
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = 100000
    optim.schedule = "constant"
    optim.grad_clip = 1.0
    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 800000
    train.log_every = 100
    train.sample_every = 50000
    train.checkpoint_every = 10000
    train.seed = 0

    config.cld.sampler = "sscs"
    config.cld.striding = "quadratic"
    sample = config.sample
    sample.num_steps = 150
    sample.denoise_final = True
    sample.num_samples = 64
    sample.batch_size = 256

    config.report.probe = False          # no scalar eps for the readout sweep
    config.eval.bpd = False
    return config
