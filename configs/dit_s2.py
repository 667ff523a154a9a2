"""DiT-S/2 (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") on CIFAR-10 pixels,
class-conditional, with the paper's training recipe.

Source: facebookresearch/DiT `train.py` and the paper, section 4 / appendix: AdamW, lr 1e-4
constant, no weight decay, no warm-up, batch 256, EMA 0.9999, horizontal flips, class-label dropout
0.1 for classifier-free guidance; linear DDPM schedule beta 1e-4 -> 0.02, T = 1000; 250 sampling
steps; DiT-S: 12 layers, width 384, 6 heads (baselines.md, "Networks"), patch size 2, adaLN-Zero.
The paper trains on 32x32x4 ImageNet-256 VAE latents; here the same 32x32 token grid comes from
CIFAR-10 pixels (32x32x3, 10 classes), latent-free: 256 tokens per image, 32.5M parameters.
Steps: 400k (the paper's length for its model-size ablations).

Deviations: the paper also learns the variance (out_channels 2C, L_simple + L_vb); this config
trains L_simple only (eps prediction, fixed variance), and samples with ancestral steps on a
250-step respaced grid without guidance (set `--config.sample.guidance_scale=1.5` for the
paper's CFG scale).
"""
from diffusion_jax.config import base_config
from diffusion_jax.networks import DIT_SIZES


def get_config():
    config = base_config(model_type="dit", process="ddpm", objective="eps")

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 256
    data.random_flip = True

    model = config.model
    size = DIT_SIZES["S"]
    model.depth = size["depth"]            # 12
    model.hidden_size = size["hidden_size"]  # 384
    model.num_heads = size["num_heads"]    # 6
    model.patch_size = 2
    model.mlp_ratio = 4.0
    model.num_classes = 10
    model.dropout = 0.0
    model.frequency_dim = 256
    model.time_scale = 1000.0

    p = config.process.kwargs
    p.num_steps = 1000
    p.beta_start = 1e-4
    p.beta_end = 0.02
    p.beta_schedule = "linear"

    o = config.objective.kwargs
    o.weighting = "none"
    o.time_sampling = "uniform"
    o.reduce = "mean"
    config.objective.label_dropout = 0.1   # class_dropout_prob

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.betas = (0.9, 0.999)
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup_steps = 0
    optim.schedule = "constant"
    optim.grad_clip = 0.0

    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 400_000
    train.log_every = 100
    train.sample_every = 10_000
    train.checkpoint_every = 50_000        # ckpt_every
    train.keep = 3
    train.seed = 0

    sample = config.sample
    sample.sampler = "ancestral"
    sample.num_steps = 249                 # + the final x0 step (sample.denoise_final): 250 NFE,
                                           # DiT's 250 respaced DDPM steps
    sample.denoise_final = True
    sample.spacing = "uniform"
    sample.num_samples = 64
    sample.guidance_scale = 1.0
    return config
