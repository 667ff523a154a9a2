"""Score SDE: DDPM++ cont. (VP) on CIFAR-10 (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations").

Source: yang-song/score_sde `configs/vp/cifar10_ddpmpp_continuous.py` and
`configs/vp/cifar10_ddpmpp_deep_continuous.py` over `configs/default_cifar10_configs.py`:
training.batch_size 128, n_iters 1300001, snapshot_freq 50000, log_freq 50; optim Adam lr 2e-4,
beta1 0.9, eps 1e-8, warmup 5000, grad_clip 1; model.beta_min 0.1, beta_max 20, dropout 0.1;
sde 'vpsde', continuous, reduce_mean True, likelihood_weighting False, ema_rate 0.9999; nf 128,
ch_mult (1, 2, 2, 2), num_res_blocks 4 (deep: 8, with n_iters 950001), attn_resolutions (16,),
resblock_type 'biggan', skip_rescale True, embedding 'positional', centered data; sampling PC with
predictor euler_maruyama and no corrector, noise_removal. Headline numbers (baselines.md):
DDPM++ cont. deep VP 3.13 bits/dim, ODE FID 3.08.

    --config=configs/score_sde_vp_cifar10.py       DDPM++ cont. (VP), 4 blocks, 62.5M
    --config=configs/score_sde_vp_cifar10.py:deep  DDPM++ cont. deep (VP), 8 blocks, 108M

Mapping: the network predicts eps and the score is -eps_hat / sigma (score_sde's VP models,
scale_by_sigma=False), so the loss is denoising score matching with sigma^2 weighting, reduce
'mean' ('dsm' with prediction 'eps'), t ~ U[1e-5, 1] (process t_min = 1e-5: score_sde's training
eps); sampling stops at t = 1e-3 (its sampling eps). Sampling: score_sde evaluates the predictor at
the N = 1000 times linspace(1, 1e-3, N), adding noise at every step but the last, whose noise-free
mean x + (f x - g^2 score) dt (noise_removal) is the denoised x0_hat = x + sigma^2 score to first
order; here 999 Euler-Maruyama steps on those times, all with noise, then x0_hat at 1e-3
(`sample.denoise_final`): 1000 NFE. Likelihood (`eval.bpd_t_min`): score_sde's likelihood eps 1e-5.
The time embedding sees 999 t (score_sde's
labels for continuous VP / sub-VP). Not modelled: init_scale 0 of the residual blocks' last convs,
n_jitted_steps (a speed option). The stored copy of the upstream default_cifar10_configs.py reads
batch_size 2 with 128 commented out (a debugging edit); the paper and the other copies
(score_sde_pytorch, forks) use 128, kept here.
"""
from diffusion_jax.config import base_config

VARIANTS = ("", "deep")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of score_sde_vp_cifar10; valid: {VARIANTS}")
    deep = variant == "deep"
    config = base_config(model_type="unet", process="vp", objective="dsm")

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 128
    data.random_flip = True

    model = config.model
    model.ch = 128                       # nf
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 8 if deep else 4
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.time_embedding = "sinusoidal"  # embedding_type 'positional'
    model.time_scale = 999.0             # continuous VP: labels = 999 t
    model.resblock_updown = True         # resblock_type 'biggan'
    model.resample_with_conv = True
    model.skip_rescale = True
    model.scale_shift_norm = False

    p = config.process.kwargs
    p.beta_min = 0.1
    p.beta_max = 20.0
    p.t_min = 1e-5                       # training eps
    p.t_max = 1.0

    o = config.objective.kwargs
    o.prediction = "eps"                 # score = -model / sigma (scale_by_sigma=False)
    o.weighting = "sigma2"               # likelihood_weighting=False
    o.importance_sampling = False
    o.reduce = "mean"                    # reduce_mean=True

    optim = config.optim
    optim.learning_rate = 2e-4
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = 5000
    optim.schedule = "constant"
    optim.grad_clip = 1.0

    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 950_001 if deep else 1_300_001
    train.log_every = 50
    train.sample_every = 50_000          # snapshot_sampling at every snapshot
    train.checkpoint_every = 50_000      # snapshot_freq (kept for evaluation)
    train.keep = 30
    train.seed = 42

    sample = config.sample
    sample.sampler = "euler_maruyama"    # PC: predictor euler_maruyama, corrector none
    sample.num_steps = 999               # grid linspace(1, eps, num_scales = 1000): score_sde's timesteps
    sample.spacing = "uniform"
    sample.t_end = 1e-3                  # sampling eps
    sample.denoise_final = True          # noise_removal: the last call returns x0_hat (1000 NFE)
    sample.num_samples = 64

    config.eval.bpd = False              # eval.enable_bpd (slow; 5 repeats in the paper)
    config.eval.bpd_repeats = 5
    config.eval.bpd_t_min = 1e-5         # likelihood eps (score_sde's get_likelihood_fn eps=1e-5)
    return config
