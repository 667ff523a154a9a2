"""DDAE on CIFAR-10 (Xiang et al. 2023, "Denoising Diffusion Autoencoders are Unified
Self-supervised Learners"; FutureXiang/ddae): the DDPM CIFAR-10 model of configs/ddpm_cifar10.py
(35.7M UNet, T = 1000 linear betas, eps prediction, 800k steps) used as a representation learner.

Readouts: global-average-pooled outputs of the decoder blocks at low noise. DDAE's best for this
network is DDPM timestep 11 of 1000 (t = 12/1000 here) at a middle decoder block (16x16 / 8x8:
'up_2_*', 'up_1_*'); linear probe 90.05% (baselines.md). The sweep below covers t around it and
those blocks; `--mode=probe` writes the accuracy table and the (t, block) heat map.

Variant 'diffusers' probes the published network (google/ddpm-cifar10-32, converted at start-up,
configs/ddpm_cifar10_diffusers.py) with no training, so a user with the data and the weights checks
the paper's 90.05% (DDAE's probe trains 15 epochs with augmentation; ours is the library's
logistic regression on fixed features, DDAE's mean pooling):

    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32     # once, online
    python -m diffusion_jax --config=configs/ddae_cifar10.py:diffusers --workdir=runs/ddae_hub \
        --config.model.init_from=diffusers:ddpm-cifar10-32 --mode=probe
"""
import os

from diffusion_jax.config import load_file


def get_config(variant: str = ""):
    if variant not in ("", "diffusers"):
        raise ValueError(f"configs/ddae_cifar10.py: unknown variant {variant!r}; valid: '', "
                         "'diffusers'")
    base = "ddpm_cifar10_diffusers.py" if variant else "ddpm_cifar10.py"
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), base))
    r = config.readout
    r.timesteps = (0.012, 0.026, 0.051, 0.101, 0.201)
    r.blocks = ("mid", "up_3_2", "up_2_0", "up_2_1", "up_2_2", "up_1_0", "up_1_1", "up_1_2")
    r.knn_k = 20
    return config
