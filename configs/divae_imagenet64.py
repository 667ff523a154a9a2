"""DiVAE (Shi et al. 2022, arXiv 2206.00386) at the closest setting this library expresses:
ImageNet at 64x64 (the paper trains on ImageNet 256x256; ../shared/reference/baselines.md lists
no number for it). model.family='divae'.

    python -m diffusion_jax --config=configs/divae_imagenet64.py --workdir=runs/divae_imagenet64

Sources. DiVAE has no public code. From the paper (abstract and introduction, the text we could
read): a VQ-VAE whose decoder is a denoising diffusion model, the image embedding (the quantised
codes) inserted into the diffusion UNet by a simple modification, trained on ImageNet 256x256.
Everything else below is OUR choice, taken from the works DiVAE builds on, and marked so:

    VQ encoder   VQGAN's ImageNet f16 tokenizer (Esser et al. 2021, taming-transformers
                 `vqgan_imagenet_f16_16384`: 16x16 code maps, codebook 16384 x 256, beta 0.25)
                 brought to 64x64 by f = 4 (levels (128, 128, 256), 2 res blocks, mid attention),
                 so that an image is still a 16x16 map of codes; EMA codebook (decay 0.99) with
                 dead-code restarts instead of VQGAN's loss-learned codebook (our choice: it keeps
                 a 16384-code book in use); L2 reconstruction only (no LPIPS / patch GAN: the
                 library has neither)
    decoder      ADM's ImageNet-64 UNet (Dhariwal & Nichol 2021: ch 192, ch_mult (1, 2, 3, 4), 3
                 res blocks, attention at 32, 16, 8 with 64-channel heads, BigGAN up/down blocks,
                 AdaGN, dropout 0.1) on concat(x_t, up_4(z_q)); cosine process, eps prediction
                 (ADM learns the variance with L_hybrid; the divae family refuses 'hybrid', so
                 L_simple here)
    schedule     VQ stage 200k steps, then the diffusion decoder for 400k (our choice), batch 256,
                 Adam 1e-4, EMA 0.9999
    sampling     DDIM 50 steps from the codes of random training images (no code prior here; the
                 paper pairs DiVAE with an autoregressive transformer over the codes)

ImageNet is read through tfds (`tfds:imagenet2012`, prepared once with `tfds build imagenet2012
--file_format=array_record` from the manual download) and resized to 64x64 by the pipeline.
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="cosine", objective="eps")
    config.model.family = "divae"

    data = config.data
    data.name = "tfds:imagenet2012"
    data.image_size = 64
    data.batch_size = 256
    data.random_flip = True

    vq = config.vq
    vq.num_codes = 16384
    vq.code_dim = 256
    vq.beta = 0.25
    vq.ema_decay = 0.99
    vq.dead_after = 100
    vq.steps = 200_000
    vq.block_out_channels = (128, 128, 256)
    vq.layers_per_block = 2
    vq.norm_num_groups = 32
    vq.mid_attention = True
    vq.conditioning = "concat"

    m = config.model
    m.ch = 192
    m.ch_mult = (1, 2, 3, 4)
    m.num_res_blocks = 3
    m.attn_resolutions = (32, 16, 8)
    m.head_dim = 64
    m.dropout = 0.1
    m.scale_shift_norm = True
    m.resblock_updown = True

    config.process.kwargs.s = 0.008

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.warmup_steps = 0
    optim.weight_decay = 0.0
    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 600_000
    train.log_every = 100
    train.sample_every = 10_000
    train.checkpoint_every = 10_000

    sample = config.sample
    sample.sampler = "ddim"
    sample.num_steps = 50
    sample.num_samples = 64
    sample.batch_size = 64

    config.report.probe = False        # the readout sweep runs the denoiser without codes
    return config
