"""Critically-damped Langevin diffusion (CLD; Dockhorn, Vahdat & Kreis, ICLR 2022) on the embedded
digits (issue 14): model.family='cld', the phase-space process 'cld' and hybrid score matching.

    python -m diffusion_jax --config=configs/cld_digits.py --workdir=runs/cld_digits

Process: the paper's CIFAR-10 constants (nv-tlabs/CLD-SGM configs/default_cifar10.txt): M^-1 = 4 (so
M = 0.25 and critical damping Gamma = 1), gamma = 0.04 (v0 ~ N(0, 0.01)), beta(t) = 4 constant, t in
[1e-3, 1]. Objective: HSM with the 'eps' weighting (reweightedv2) and the mixed score, t ~ U(1e-5, 1).

Network, data, optimiser and schedule are the embedded default's (configs/default.py, as in
configs/flow_digits.py) without the autoencoder: a UNet ch 32, ch_mult (1, 2), 1 res block, attention
at 8x8, AdaGN time conditioning, here on concat(x, v) (2 channels in, 1 out); AdamW lr 1e-3 (100
warm-up steps, cosine to 1e-4), batch 32, 1 500 steps, EMA 0.999 with warm-up. Sampling: SSCS
(symmetric splitting, the paper's sampler) with 100 steps on the official quadratic grid, plus the
final denoising step: 101 network evaluations.

Not a paper configuration (configs/cld_cifar10.py is): sizes and rates are chosen for speed, and the
time embedding is the UNet's sinusoidal one of 1000 t (the official NCSN++ uses Gaussian Fourier
features of log t). --mode=eval with eval.bpd=True gives the paper's phase-space bits/dim bound; no
probe table (CLD has no scalar eps; models/cld.py).
"""
from ml_collections import config_dict

from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cld", objective="cld_hsm")
    config.model.family = "cld"

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
    model.scale_shift_norm = True

    p = config.process.kwargs
    p.m_inv = 4.0
    p.gamma = 0.04
    p.beta0 = 4.0
    p.beta1 = 0.0
    p.damping = config_dict.placeholder(float)   # None: critical, Gamma = 2 sqrt(M)
    p.t_min = 1e-3
    p.t_max = 1.0
    o = config.objective.kwargs
    o.objective = "hsm"
    o.weighting = "eps"
    o.mixed_score = True
    o.loss_eps = 1e-5

    optim = config.optim
    optim.learning_rate = 1e-3
    optim.warmup_steps = 100
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.1
    optim.grad_clip = 1.0
    config.ema.decays = (0.999,)
    config.ema.warmup = True

    train = config.train
    train.num_steps = 1500
    train.log_every = 25
    train.sample_every = 750
    train.checkpoint_every = 250
    train.keep = 2
    train.seed = 0

    config.cld.sampler = "sscs"
    config.cld.striding = "quadratic"
    sample = config.sample
    sample.num_steps = 100
    sample.denoise_final = True
    sample.num_samples = 64
    sample.batch_size = 64

    config.report.probe = False        # no scalar eps for the readout sweep
    config.eval.bpd = False
    config.eval.num_batches = 0
    return config
