"""DMZ on CIFAR-10 as Proszewska, Malkin & Siddharth (2025) train it ("On Designing Diffusion
Autoencoders for Efficient Generation and Representation Learning"; exlab-research/dmz README,
`ddpm_train.py`; /work/shared/reference/baselines.md, "Diffusion autoencoders").

    encoder   stride-2 3x3 conv + BatchNorm + LeakyReLU, 32 -> 16 -> 8 -> 4 -> 2 (channels 32, 64,
              128, 256), flatten, linear to (16, 2) logits; z = 16 Gumbel-softmax bits (tau 1;
              soft in training, hard one-hot in evaluation), flattened to 32 values
    decoder   UNet ch 128, ch_mult (1, 2, 2, 2), 3 res blocks, attention (head dim 32) at 16x16
              and 8x8 with z as one cross-attention token in every attention block, AdaGN
              time conditioning (scale-shift), dropout 0.3, learned variance (6 output channels)
    process   fixed cosine DDPM, T = 1000; DDPM-IP input perturbation gamma = 0.15
    loss      hybrid: eps MSE + the improved-DDPM variational term (learned range), t importance-
              sampled by the loss second moment; no KL term
    optimiser AdamW lr 1e-4, no weight decay, batch 128, EMA 0.9999
    sampling  z ~ i.i.d. Bernoulli(0.5) bits; ancestral with 100 respaced steps (the authors'
              `--timestep_respacing 100`)

The authors' script trains until stopped (lr_anneal_steps 0); train.num_steps = 500k is ours.
CIFAR-10 must be prepared once (`tfds build cifar10 --file_format=array_record`).
"""
from diffusion_jax.config import base_config


def get_config():
    config = base_config(model_type="unet", process="ddpm", objective="hybrid")

    data = config.data
    data.name = "cifar10"
    data.image_size = 32
    data.batch_size = 128
    data.random_flip = True

    m = config.model
    m.ch = 128
    m.ch_mult = (1, 2, 2, 2)
    m.num_res_blocks = 3
    m.attn_resolutions = (16, 8)
    m.head_dim = 32
    m.dropout = 0.3
    m.scale_shift_norm = True

    ae = config.autoencoder
    ae.kind = "dmz"
    ae.encoder = "conv"
    ae.latent = "binary"
    ae.z_dim = 16
    ae.z_conditioning = ("cross_attn",)
    ae.encoder_ch = 32                     # 32, 64, 128, 256 down to 2x2
    ae.norm = "batch"
    ae.tau = 1.0
    ae.prior = "bernoulli"
    ae.straight_through = False            # DMZ: F.gumbel_softmax(h, hard=not self.training)
    ae.bit_usage_weight = 0.0              # DMZ's loss has no bit-usage term (issue 12's switch)

    p = config.process.kwargs
    p.num_steps = 1000
    p.beta_schedule = "cosine"

    o = config.objective.kwargs
    o.vb_weight = 0.001
    o.input_perturbation = 0.15
    o.time_sampling = "loss_aware"

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.weight_decay = 0.0
    optim.warmup_steps = 0
    optim.schedule = "constant"
    optim.grad_clip = 0.0                  # guided-diffusion's TrainLoop does not clip

    config.ema.decays = (0.9999,)

    train = config.train
    train.num_steps = 500_000
    train.log_every = 100
    train.sample_every = 20_000
    train.checkpoint_every = 10_000

    s = config.sample
    s.sampler = "ancestral"
    s.num_steps = 99                       # + the final x0 step (denoise_final): 100 NFE, the
    s.denoise_final = True                 # paper's 100 respaced ancestral steps
    s.spacing = "uniform"
    s.kwargs.variance = "learned_range"
    s.kwargs.clip_x0 = True

    config.readout.timesteps = (0.012, 0.05, 0.1, 0.25)
    return config
