"""Score SDE: NCSN++ cont. (VE) on CIFAR-10 (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations").

Source: yang-song/score_sde `configs/ve/cifar10_ncsnpp_continuous.py` and
`configs/ve/cifar10_ncsnpp_deep_continuous.py` over `configs/default_cifar10_configs.py`:
training.batch_size 128, n_iters 1300001, snapshot_freq 50000, log_freq 50; optim Adam lr 2e-4,
beta1 0.9, eps 1e-8, warmup 5000, grad_clip 1; model.sigma_min 0.01, sigma_max 50, dropout 0.1;
sde 'vesde', continuous, reduce_mean False (the default), likelihood_weighting False,
ema_rate 0.999; nf 128, ch_mult (1, 2, 2, 2), num_res_blocks 4 (deep: 8, with n_iters 950001),
attn_resolutions (16,), resblock_type 'biggan', skip_rescale True, embedding 'fourier' with
fourier_scale 16, scale_by_sigma True, fir True, progressive_input 'residual'; sampling PC with
predictor reverse_diffusion and corrector langevin, snr 0.16, 1 corrector step, noise_removal.
Headline numbers (baselines.md): NCSN++ cont. deep VE FID 2.20, IS 9.89 (PC, 2000 NFE).

    --config=configs/score_sde_ve_cifar10.py       NCSN++ cont. (VE), 4 blocks
    --config=configs/score_sde_ve_cifar10.py:deep  NCSN++ cont. deep (VE), 8 blocks

Mapping: NCSN++ outputs h / sigma as the score (scale_by_sigma), i.e. h plays -eps, so the loss is
denoising score matching with sigma^2 weighting, summed over pixels ('dsm', prediction 'eps',
reduce 'sum'), t ~ U[1e-5, 1]. score_sde feeds log(sigma(t)) = log(sigma_min) + t log(sigma_max /
sigma_min) to the Gaussian Fourier embedding; here the embedding sees time_scale * t with
time_scale = log(sigma_max / sigma_min) = log(5000): the same features up to a constant phase,
which the first dense layer absorbs. Sampling: score_sde runs, at each of the N = 1000 times linspace(1, 1e-5, N), a Langevin corrector
step then a reverse-diffusion predictor step, with noise everywhere but the last predictor step,
whose noise-free mean x + sigma(1e-5)^2 score is exactly the denoised x0_hat (noise_removal). Here:
999 PC steps on those times, all with noise, then x0_hat at 1e-5 (`sample.denoise_final`); the one
corrector step score_sde still runs at t = 1e-5 is left out (1999 NFE instead of 2000). Bits/dim
at score_sde's likelihood eps 1e-5 (`eval.bpd_t_min`). Not modelled (the UNet has no such options): the FIR
resampling kernel (1, 3, 3, 1), the 'residual' progressive input path, init_scale 0. Data: this
library feeds images in [-1, 1]; score_sde's VE runs used [0, 1] (centered=False), for which
sigma_max = 50 was chosen; the sheet's sigma_max 50 is kept.
"""
import math

from diffusion_jax.config import base_config

VARIANTS = ("", "deep")
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of score_sde_ve_cifar10; valid: {VARIANTS}")
    deep = variant == "deep"
    config = base_config(model_type="unet", process="ve", objective="dsm")

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
    model.time_embedding = "fourier"     # embedding_type 'fourier'
    model.fourier_scale = 16.0
    model.time_scale = math.log(SIGMA_MAX / SIGMA_MIN)
    model.resblock_updown = True         # resblock_type 'biggan'
    model.resample_with_conv = True
    model.skip_rescale = True
    model.scale_shift_norm = False

    p = config.process.kwargs
    p.sigma_min = SIGMA_MIN
    p.sigma_max = SIGMA_MAX
    p.t_min = 1e-5                       # training and sampling eps
    p.t_max = 1.0

    o = config.objective.kwargs
    o.prediction = "eps"                 # score = h / sigma (scale_by_sigma=True), h ~ -eps
    o.weighting = "sigma2"               # likelihood_weighting=False
    o.importance_sampling = False
    o.reduce = "sum"                     # reduce_mean=False

    optim = config.optim
    optim.learning_rate = 2e-4
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = 5000
    optim.schedule = "constant"
    optim.grad_clip = 1.0

    config.ema.decays = (0.999,)         # ema_rate for VE

    train = config.train
    train.num_steps = 950_001 if deep else 1_300_001
    train.log_every = 50
    train.sample_every = 50_000
    train.checkpoint_every = 50_000
    train.keep = 30
    train.seed = 42

    sample = config.sample
    sample.sampler = "pc"
    sample.num_steps = 999               # grid linspace(1, eps, num_scales = 1000): score_sde's timesteps
    sample.spacing = "uniform"
    sample.denoise_final = True          # noise_removal: the last call returns x0_hat (1999 NFE)
    sample.num_samples = 64
    s = sample.kwargs
    s.predictor = "reverse_diffusion"
    s.corrector = "langevin"
    s.snr = 0.16
    s.n_corrector_steps = 1

    config.eval.bpd_repeats = 5
    config.eval.bpd_t_min = 1e-5         # likelihood eps (score_sde's get_likelihood_fn eps=1e-5)
    return config
