"""LSGM on CIFAR-10 (Vahdat, Kreis & Kautz, NeurIPS 2021): the "balanced" model of NVlabs/LSGM's README
as far as this library's single-scale VAE and UNet express it (model.family='lsgm').

    python -m diffusion_jax --config=configs/lsgm_cifar10.py --workdir=runs/lsgm_cifar10

Source: NVlabs/LSGM README, CIFAR-10: the VAE `train_vae.py ... --num_channels_enc 128
--num_channels_dec 128 --num_latent_scales 1 --num_groups_per_scale 20 --num_latent_per_group 9
--num_cell_per_cond_enc 2 --channel_mult 1 2 --epochs 600 --batch_size 32` on 8 GPUs (global batch
256), then LSGM (balanced) `train_vada.py ... --train_vae --dae_arch ncsnpp --embedding_scale 1000
--learning_rate_dae 1e-4 --learning_rate_min_dae 1e-4 --epochs 1875 --dropout 0.2 --batch_size 16
--num_channels_dae 512 --num_scales_dae 3 --num_cell_per_scale_dae 8 --sde_type vpsde --beta_start
0.1 --beta_end 20.0 --sigma2_0 0.0 --time_eps 0.01 --iw_sample_p drop_all_iw --iw_sample_q
reweight_p_samples --apply_sqrt2_res --fir` on 16 GPUs (global batch 256), with train_vada.py's
defaults learning_rate_vae 1e-4 -> learning_rate_min_vae 1e-5 (cosine), weight_decay 3e-4, Adam eps
1e-3 (VAE) / 1e-4 (prior), warmup_epochs 5, ema_decay 0.9999, mixing_logit_init -3,
grad_clip_max_norm 0, embedding_type positional; ncsnpp for cifar10: ch_mult (1, 1, 1), attention at
the 16x16 latent resolution, biggan res blocks. Headline (baselines.md, check): FID 2.10 (the
best-FID model), NLL <= 2.87 bits/dim (the best-NLL model).

Mapping:
    VAE         AutoencoderKL, levels (128, 256) (channel_mult 1 2: 32x32 -> 16x16), 2 res blocks per
                level (num_cell_per_cond 2), 180 latent channels at 16x16 (20 groups x 9 latents of
                NVAE's top scale, which is what the official prior models, concatenated)
    steps       600 VAE epochs (lsgm.warmup_vae_steps = 117 188 at batch 256, N(0, I) prior) + 1 875
                LSGM epochs (366 211) in one run
    prior       UNet ch 512, ch_mult (1, 1, 1), 8 res blocks per level, attention at 16, dropout 0.2,
                resblock up/down (biggan), skip rescale (apply_sqrt2_res), sinusoidal t embedding of
                1000 t (embedding_scale 1000)
    objectives  CE for the VAE with likelihood importance-sampled t (ll_iw; the official reweights the
                prior's drop_all_iw samples, 'reweight_p_samples': same expectation); the prior with
                the re-weighted 'eps' objective (drop_all; t uniform here, importance-sampled there)
    sampling    the probability-flow ODE (the paper's FID sampler: RK45, tol 1e-5): 'adaptive'
                (Tsit5) rtol = atol = 1e-5; eval.bpd: the family's bound (`LSGMFamily.nll_bound`)

Not modelled (what does not map): NVAE's hierarchy (20 conditional groups, residual cells with
squeeze-excitation, BN-swish, spectral and batch-norm regularisation weight_decay_norm 1e-2, KL
balancing, KL warm-up over half of the VAE epochs), its discretised logistic mixture decoder (here a
discretised Gaussian with one learned std), NCSN++'s FIR resampling and custom convs, shared t /
noise between the VAE's and the prior's terms, the official coupled (L2) Adam weight decay (here
AdamW's decoupled decay), and an EMA of the prior only (here of both groups). The NLL is evaluated
at the training time_eps 0.01 (the official ODE starts at 1e-6; eval.bpd_t_min cannot go below the
process' t_min here); any density gives a bound, but the number is not the paper's.
"""
from diffusion_jax.config import base_config

IMAGES, BATCH = 50_000, 256
VAE_EPOCHS, LSGM_EPOCHS, WARMUP_EPOCHS = 600, 1875, 5


def _steps(epochs: int) -> int:
    return -(-epochs * IMAGES // BATCH)


def get_config():
    config = base_config(model_type="unet", process="vp", objective="eps")
    config.model.family = "lsgm"

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = BATCH
    data.random_flip = True

    ls = config.lsgm
    ls.vae_channels = (128, 256)
    ls.vae_layers_per_block = 2
    ls.latent_channels = 180
    ls.vae_norm_groups = 32
    ls.vae_mid_attention = False
    ls.decoder_std = 0.1
    ls.learn_decoder_std = True
    ls.kl_weight = 1.0                  # balanced model: no KL annealing in the LSGM stage
    ls.mixing_logit_init = -3.0
    ls.time_sampling_q = "importance"
    ls.prior_weighting = "eps"
    ls.vae_lr = 1e-4
    ls.prior_lr = 1e-4
    ls.vae_adam_eps = 1e-3
    ls.prior_adam_eps = 1e-4
    ls.vae_end_lr_factor = 0.1          # 1e-4 -> 1e-5
    ls.warmup_vae_steps = _steps(VAE_EPOCHS)

    model = config.model
    model.ch = 512
    model.ch_mult = (1, 1, 1)
    model.num_res_blocks = 8
    model.attn_resolutions = (16,)
    model.dropout = 0.2
    model.time_embedding = "sinusoidal"
    model.time_scale = 1000.0
    model.resblock_updown = True
    model.resample_with_conv = True
    model.skip_rescale = True

    p = config.process.kwargs
    p.beta_min = 0.1
    p.beta_max = 20.0
    p.t_min = 0.01                      # time_eps
    p.t_max = 1.0

    optim = config.optim
    optim.learning_rate = 1e-4          # per group: lsgm.vae_lr / prior_lr
    optim.betas = (0.9, 0.999)
    optim.weight_decay = 3e-4
    optim.warmup_steps = _steps(WARMUP_EPOCHS)
    optim.schedule = "cosine"
    optim.end_lr_factor = 1.0           # the prior's lr stays 1e-4 (learning_rate_min_dae)
    optim.grad_clip = 0.0
    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = _steps(VAE_EPOCHS) + _steps(LSGM_EPOCHS)
    train.log_every = 100
    train.sample_every = 25_000
    train.checkpoint_every = 25_000
    train.keep = 10
    train.seed = 1

    sample = config.sample
    sample.sampler = "adaptive"
    sample.kwargs.rtol = 1e-5
    sample.kwargs.atol = 1e-5
    sample.num_samples = 64
    sample.batch_size = 64

    config.eval.bpd = True
    config.eval.bpd_num_examples = 512
    config.report.probe = False
    return config
