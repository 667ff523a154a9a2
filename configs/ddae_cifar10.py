"""DDAE on CIFAR-10 (Xiang et al. 2023, "Denoising Diffusion Autoencoders are Unified
Self-supervised Learners"; FutureXiang/ddae): the DDPM CIFAR-10 model of configs/ddpm_cifar10.py
(35.7M UNet, T = 1000 linear betas, eps prediction, 800k steps) used as a representation learner.

Readouts: global-average-pooled outputs of the decoder blocks at low noise. DDAE's best for this
network is DDPM timestep 11 of 1000 (t = 12/1000 here) at a middle decoder block (16x16 / 8x8:
'up_2_*', 'up_1_*'); linear probe 90.05% (baselines.md). The sweep below covers t around it and
those blocks; `--mode=probe` writes the accuracy table and the (t, block) heat map.
"""
import os

from diffusion_jax.config import load_file


def get_config():
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "ddpm_cifar10.py"))
    r = config.readout
    r.timesteps = (0.012, 0.026, 0.051, 0.101, 0.201)
    r.blocks = ("mid", "up_3_2", "up_2_0", "up_2_1", "up_2_2", "up_1_0", "up_1_1", "up_1_2")
    r.knn_k = 20
    return config
