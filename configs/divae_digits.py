"""DiVAE (Shi et al. 2022) on the embedded digits (issue 15): model.family='divae'.

    python -m diffusion_jax --config=configs/divae_digits.py --workdir=runs/divae_digits

VQ-VAE: encoder (networks.autoencoder_kl levels (32, 64), 1 res block per level, no mid attention)
16x16x1 -> a 8x8 map of 4-dim codes (f = 2), codebook of 64 codes by EMA (decay 0.99) with
dead-code restarts after 100 unused updates, commitment beta 0.25, trained with its deterministic
decoder (networks.autoencoder_kl.VAEDecoder, levels (48, 88): 738k parameters, the size of the
diffusion UNet's 756k) on the L2 reconstruction for the first 600 of 1 500 steps.
Then the VQ is frozen and the diffusion decoder (the embedded default's UNet: ch 32, ch_mult
(1, 2), 1 res block, attention at 8x8, AdaGN; cosine process, v prediction) trains for the
remaining 900 steps on (x0, z_q(x0)), z_q nearest-upsampled to 16x16 and concatenated to x_t.
Sampling: DDIM 50 steps from the codes of random training images (no code prior here).

Not a paper configuration: sizes and rates are chosen for speed (see configs/divae_imagenet64.py).
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cosine", objective="v")
    config.model.family = "divae"

    data = config.data
    data.name = "digits/16"
    data.image_size = 16
    data.batch_size = 32
    data.random_flip = False

    vq = config.vq
    vq.num_codes = 64
    vq.code_dim = 4
    vq.beta = 0.25
    vq.ema_decay = 0.99
    vq.dead_after = 100
    vq.steps = 600
    vq.block_out_channels = (32, 64)
    vq.layers_per_block = 1
    vq.norm_num_groups = 8
    vq.mid_attention = False
    vq.decoder_channels = (48, 88)    # the deterministic decoder: 738k parameters, the UNet 756k
    vq.conditioning = "concat"

    model = config.model
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (8,)
    model.dropout = 0.0
    model.scale_shift_norm = True

    config.process.kwargs.s = 0.008
    config.objective.kwargs.weighting = "none"
    config.objective.kwargs.time_sampling = "uniform"

    optim = config.optim
    optim.learning_rate = 1e-3
    optim.warmup_steps = 100
    optim.schedule = "cosine"
    optim.end_lr_factor = 0.1
    optim.grad_clip = 1.0
    optim.weight_decay = 0.0           # the frozen VQ must not shrink (it lives in model_state anyway)
    config.ema.decays = (0.999,)
    config.ema.warmup = True

    train = config.train
    train.num_steps = 1500
    train.log_every = 25
    train.sample_every = 750
    train.checkpoint_every = 250
    train.keep = 2
    train.seed = 0

    sample = config.sample
    sample.sampler = "ddim"
    sample.num_steps = 50
    sample.num_samples = 64
    sample.batch_size = 64

    config.report.probe = False        # the readout sweep runs the denoiser without codes
    config.eval.num_batches = 0
    return config
