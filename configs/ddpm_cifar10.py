"""DDPM on CIFAR-10 exactly as Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models".

Source: hojonathanho/diffusion `scripts/run_cifar.py` (train(): model 'unet2d16b2', total_bs 128,
Adam lr 2e-4, warmup 5000, grad_clip 1, T = 1000 linear betas 1e-4..0.02, eps prediction, mse loss,
model_var_type 'fixedlarge', dropout 0.1, randflip 1) and the paper (EMA 0.9999, 800k steps,
FID 3.17, IS 9.46); /work/shared/reference/baselines.md, "Networks".

    network   UNet ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1,
              additive sinusoidal time embedding of the integer timestep: 35,746,307 parameters
    process   discrete DDPM, T = 1000, beta linear 1e-4 -> 0.02 ('ddpm'; the network sees
              t = (n + 1) / T and embeds 1000 t = n + 1)
    loss      L_simple = E ||eps - eps_hat||^2, mean over pixels, uniform integer timesteps
    optimiser Adam (AdamW with weight_decay 0) lr 2e-4, linear warm-up 5000 steps, then constant;
              global-norm clip 1.0; EMA 0.9999; batch 128; random horizontal flips; 800k steps
    sampling  Ho et al.'s p_sample_loop, 1000 model calls at the integer timesteps n = 999..0: ancestral
              on the grid t = 1000/T .. 1/T (999 steps, each n -> n - 1 with fresh noise of variance
              beta_n, 'fixedlarge'), then the last call at n = 0 returns x0_hat with no noise
              (`sample.denoise_final`: Ho's posterior mean at t = 1 -> 0 is x0_hat, since
              alpha-bar_{-1} = 1); x0_hat clipped to [-1, 1] at every step (clip_denoised=True)

CIFAR-10 must be prepared once (`tfds build cifar10 --file_format=array_record`, needs TensorFlow
and internet); without it training fails at once with the exact command to run.
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="ddpm", objective="eps")

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 128
    data.random_flip = True

    model = config.model
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.time_embedding = "sinusoidal"
    model.time_scale = 1000.0
    model.resblock_updown = False
    model.resample_with_conv = True
    model.scale_shift_norm = False
    model.skip_rescale = False

    p = config.process.kwargs
    p.num_steps = 1000
    p.beta_start = 1e-4
    p.beta_end = 0.02
    p.beta_schedule = "linear"

    o = config.objective.kwargs
    o.weighting = "none"
    o.time_sampling = "uniform"
    o.reduce = "mean"

    optim = config.optim
    optim.learning_rate = 2e-4
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = 5000
    optim.schedule = "constant"
    optim.grad_clip = 1.0
    optim.grad_accum = 1

    config.ema.decays = (0.9999,)
    config.ema.warmup = False

    train = config.train
    train.num_steps = 800_000
    train.log_every = 100
    train.sample_every = 10_000
    train.checkpoint_every = 10_000
    train.keep = 2                      # keep_checkpoint_max=2
    train.seed = 0

    sample = config.sample
    sample.sampler = "ancestral"
    sample.num_steps = 999              # grid t = (n + 1)/T, n = 999..0: Ho's integer timesteps
    sample.spacing = "uniform"
    sample.denoise_final = True         # Ho's last call (n = 0) returns x0_hat, noise-free: 1000 NFE
    sample.num_samples = 64
    sample.kwargs.variance = "beta"     # model_var_type='fixedlarge'
    sample.kwargs.clip_x0 = True        # p_sample(clip_denoised=True)

    # Bits/dim (--mode=eval with eval.bpd): the PF-ODE density at t = 1/T, the smallest time of the
    # discrete model (sigma = 0.01). Not Ho et al.'s 3.75 bits/dim, which is their variational bound
    # with a discretised decoder L_0 at t = 1; the PF-ODE bound is score_sde's estimator.
    config.eval.bpd_t_min = 1e-3
    return config
