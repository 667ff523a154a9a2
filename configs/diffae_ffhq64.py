"""DiffAE on FFHQ-64 as Preechakul et al. (2022) train it ("Diffusion Autoencoders: Toward a
Meaningful and Decodable Representation"; phizaz/diffae `templates.py: ffhq64_autoenc`,
`templates_latent.py: ffhq64_autoenc_latent`; /work/shared/reference/baselines.md).

    encoder   half-UNet (ch 64, ch_mult (1, 2, 4, 8, 8), 2 res blocks, attention at 16x16),
              GroupNorm -> SiLU -> global average pool -> linear: z_sem, 512-d, deterministic
    decoder   UNet ch 64, ch_mult (1, 2, 4, 8), 2 res blocks, attention at 16x16, dropout 0.1,
              ResBlocks conditioned as h = (GN(h)(1 + t_s) + t_b)(1 + W z_sem)
    process   DDPM, T = 1000, linear betas 1e-4 .. 0.02; eps prediction, L_simple
    optimiser Adam lr 1e-4, no warm-up, batch 32 x 4 GPUs = 128, EMA 0.9999, 72M images (562.5k
              steps); encoder trained only through the diffusion loss
    latent    latent DDIM: MLP with skips, 10 layers x 2048, on normalised z_sem, L1 eps loss,
              batch 512; its process is the library's DDPM with linear betas (the authors use a
              constant beta 0.008 schedule; see the docs of `autoencoders.latent_sampler`)
    sampling  DDIM (T_eval 20 in the authors' evaluation; 50 here); interpolation: linear in
              z_sem, spherical in x_T; manipulation z + 0.3 sqrt(512) normalise(w)

FFHQ is read through tfds (`tfds:ffhq`, prepared once with `tfds build ffhq
--file_format=array_record`, manual download) and resized to 64x64 by the pipeline; use
`--config.data.name=folder:<dir of PNGs>` for an image folder instead.
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="ddpm", objective="eps")

    data = config.data
    data.name = "tfds:ffhq"
    data.image_size = 64
    data.batch_size = 128
    data.random_flip = True

    m = config.model
    m.ch = 64
    m.ch_mult = (1, 2, 4, 8)
    m.num_res_blocks = 2
    m.attn_resolutions = (16,)
    m.dropout = 0.1
    m.scale_shift_norm = True

    ae = config.autoencoder
    ae.kind = "diffae"
    ae.encoder = "semantic"
    ae.latent = "continuous"
    ae.z_dim = 512
    ae.z_conditioning = ("adagn_scale",)
    ae.encoder_ch = 64
    ae.encoder_ch_mult = (1, 2, 4, 8, 8)
    ae.encoder_num_res_blocks = 2
    ae.encoder_attn_resolutions = (16,)
    ae.pool = "mean"                       # DiffAE: adaptive average pooling to z_sem

    p = config.process.kwargs
    p.num_steps = 1000
    p.beta_start = 1e-4
    p.beta_end = 0.02
    p.beta_schedule = "linear"

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.warmup_steps = 0
    optim.schedule = "constant"
    optim.grad_clip = 1.0

    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 562_500
    train.log_every = 100
    train.sample_every = 20_000
    train.checkpoint_every = 10_000

    ls = config.latent_sampler
    ls.num_steps = 588_000               # 301M latents / batch 512
    ls.num_layers = 10
    ls.hidden = 2048
    ls.batch_size = 512
    ls.learning_rate = 1e-4
    ls.loss = "l1"

    s = config.sample
    s.sampler = "ddim"
    s.num_steps = 50
    s.spacing = "uniform"
    return config
