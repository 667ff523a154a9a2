"""The embedded default, the README's first command: a small DiffAE (diffusion autoencoder) on the
digits/16 dataset (1 500 16x16 grey-scale digits from scikit-learn, prepared offline on first use).
It trains in 8-11 minutes on 2 CPU cores (10.5-16 min end to end with the report, as the
machine's speed varies) and needs nothing downloaded:

    python -m diffusion_jax --config=configs/default.py --workdir=runs/default

then writes workdir/report.html (and report.md): samples, reconstructions, interpolations, the
loss curve and the probe table (linear probe and k-NN on the digit labels for raw pixels, PCA,
DDAE readouts and the DiffAE latent z_sem). Ctrl-C saves a checkpoint; the same command resumes.

Not a paper configuration (configs/diffae_ffhq64.py is): sizes and rates are chosen for speed.
    encoder   half-UNet (ch 32, ch_mult (1, 2), 1 res block), then the 8x8x64 features FLATTENED
              (autoencoder.pool='flatten') -> z_sem, 32-d continuous. DiffAE's global average
              pooling keeps what the last level's local features say but not where: on 16x16
              digits with a two-level encoder z then probes below PCA-32 (issue 12; see
              bench/autoencoder_design.py)
    decoder   UNet ch 32, ch_mult (1, 2), 1 res block, attention at 8x8, AdaGN time conditioning,
              z_sem through h (1 + W z) in every ResBlock (DiffAE); 0.77M parameters, the encoder
              0.38M (1.15M in all)
    process   cosine (improved DDPM), v prediction (Salimans & Ho 2022), uniform t. In eps units
              the v loss weighs each t by 1/alpha_t^2, i.e. it counts the high-noise steps where
              the content of the image is decided; with L_simple (eps) the decoder learns to use z
              less, and far fewer (z, fresh noise) reconstructions keep their digit
    optimiser AdamW lr 1e-3, 100 warm-up steps, cosine decay to 1e-4, batch 32, 1 500 steps;
              EMA 0.999 with warm-up (runs are short)
    latent    DiffAE's latent DDIM (MLP with skips, 4 x 256) trained for 1 500 steps on the
              normalised z_sem of the training set, for unconditional samples
    sampling  DDIM, 50 steps, x0_hat clipped to [-1, 1] (DDPM's clip_denoised: on the cosine
              process alpha(t_max) = 0.0084, so an unclipped x0_hat amplifies the eps error ~120x
              in the first steps)
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cosine", objective="v")

    data = config.data
    data.name = "digits/16"
    data.image_size = 16
    data.batch_size = 32
    data.random_flip = False           # digits are not mirror-symmetric

    model = config.model
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (8,)
    model.dropout = 0.0
    model.scale_shift_norm = True

    ae = config.autoencoder
    ae.kind = "diffae"
    ae.encoder = "semantic"
    ae.latent = "continuous"
    ae.z_dim = 32
    ae.z_conditioning = ("adagn_scale",)
    ae.encoder_attn_resolutions = ()
    ae.pool = "flatten"

    config.process.kwargs.s = 0.008    # improved DDPM's offset (the default)
    config.objective.kwargs.weighting = "none"
    config.objective.kwargs.time_sampling = "uniform"

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

    ls = config.latent_sampler
    ls.num_steps = 1500
    ls.num_layers = 4
    ls.hidden = 256
    ls.batch_size = 256
    ls.learning_rate = 1e-3
    ls.loss = "l1"
    ls.sample_steps = 50

    sample = config.sample
    sample.sampler = "ddim"
    sample.num_steps = 50
    sample.kwargs.clip_x0 = True       # see the docstring
    sample.num_samples = 64
    sample.batch_size = 64

    report = config.report
    report.num_reconstructions = 12
    report.num_interpolations = 4
    report.interpolation_points = 8
    report.inversion_steps = 50
    report.fixed_point_iters = 2

    readout = config.readout
    readout.timesteps = (0.02, 0.1, 0.3)
    readout.blocks = ()                # every block
    readout.knn_k = 10

    config.eval.num_batches = 0        # the whole test split (297 digits)
    return config
