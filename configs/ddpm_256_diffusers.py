"""Sampling the published 256x256 DDPM networks (Ho, Jain & Abbeel 2020) from their diffusers
folders: google/ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256.

    python -m diffusion_jax --config=configs/ddpm_256_diffusers.py:church --workdir=runs/church \\
        --config.model.init_from=diffusers:ddpm-church-256 --mode=sample

Variant 'celebahq' | 'church' | 'bedroom' | 'cat', optionally ',ddim' or ',dpmpp' (as
configs/ddpm_cifar10_diffusers.py: DDIM eta 0 / DPM-Solver++(2M), 49 steps + x0_hat = 50 NFE).
The network (hojonathanho/diffusion `unet2d16b2c112244`: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res
blocks, attention at 16x16, 114M parameters) comes from the folder's config.json. Process: T = 1000,
beta linear 1e-4 -> 0.02, eps prediction. Sampler: the authors' `GaussianDiffusion.p_sample_loop`
(scripts/run_lsun.py, run_celebahq.py): ancestral with the posterior variance beta-tilde
('fixedsmall'), x0_hat clipped, 999 steps + x0_hat at n = 0 = 1000 NFE.

data.name only gives the image shape for sampling (256x256x3): celeb_a resized to 256 stands in for
CelebA-HQ, tfds:lsun/<category> for LSUN; training or FID against real data needs them prepared.
Fine-tuning uses run_lsun.py's optimiser: Adam lr 2e-5, warm-up 5000, clip 1, batch 64, dropout 0.
"""
import os

import ml_collections

from diffusion_jax.config import load_file

DATASETS = {"celebahq": ("celeb_a", True), "church": ("tfds:lsun/church_outdoor", True),
            "bedroom": ("tfds:lsun/bedroom", True), "cat": ("tfds:lsun/cat", False)}
SAMPLERS = ("", "ddim", "dpmpp")


def get_config(variant: str = "church"):
    name, _, sampler = variant.partition(",")
    if name not in DATASETS or sampler not in SAMPLERS:
        raise ValueError(f"configs/ddpm_256_diffusers.py: variant {variant!r}; expected one of "
                         f"{tuple(DATASETS)}, optionally followed by ',ddim' or ',dpmpp'")
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    f"ddpm_cifar10_diffusers.py:{sampler}" if sampler
                                    else "ddpm_cifar10_diffusers.py"))
    config.data.name, config.data.random_flip = DATASETS[name]
    config.data.image_size = 256
    config.data.batch_size = 64
    config.model.init_from = f"diffusers:ddpm-{name}-256"
    config.model.dropout = 0.0          # the folder sets the network's fields (ch_mult etc.)
    config.optim.learning_rate = 2e-5
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    if not sampler:
        config.sample.kwargs = ml_collections.ConfigDict({"variance": "posterior", "clip_x0": True})
    config.sample.batch_size = 16
    return config
