"""DiffAE on CelebA-64 (phizaz/diffae `templates.py: celeba64d2c_autoenc`): configs/diffae_ffhq64.py
on CelebA (72M images), centre-cropped and resized to 64x64 by the data pipeline.

CelebA must be prepared once (`tfds build celeb_a --file_format=array_record`).
"""
import os

from diffusion_jax.config import load_file


def get_config():
    config = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "diffae_ffhq64.py"))
    config.data.name = "celeb_a"
    return config
