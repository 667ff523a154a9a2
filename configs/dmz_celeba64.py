"""DMZ on CelebA-64 (Proszewska, Malkin & Siddharth 2025; exlab-research/dmz README "CelebA-64").

As configs/dmz_cifar10.py, with the authors' CelebA-64 settings: 64 latent bits; encoder
64 -> 32 -> 16 -> 8 -> 4 -> 2 (channels 32 ... 512); decoder UNet ch 192, ch_mult (1, 2, 3, 4),
3 res blocks, attention (head dim 64) at 32, 16 and 8 with the z token, dropout 0.1; DDPM-IP
gamma 0.1; AdamW lr 1e-4, batch 128 (2 processes x 64 in the authors' run; one global batch here).

CelebA must be prepared once (`tfds build celeb_a --file_format=array_record`); images are
centre-cropped and resized to 64x64 by the data pipeline.
"""
import os

from diffusion_jax.config import load_file


def get_config():
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dmz_cifar10.py"))
    config.data.name = "celeb_a"
    config.data.image_size = 64
    m = config.model
    m.ch = 192
    m.ch_mult = (1, 2, 3, 4)
    m.attn_resolutions = (32, 16, 8)
    m.head_dim = 64
    m.dropout = 0.1
    config.autoencoder.z_dim = 64
    config.objective.kwargs.input_perturbation = 0.1
    config.readout.timesteps = (0.012, 0.05, 0.1, 0.25)
    return config
