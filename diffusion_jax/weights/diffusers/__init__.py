"""Converters of diffusers model folders (as the Hugging Face Hub stores them) to this library.

    read_folder(path) -> (config dict, {name: np.ndarray})     `folder.py`
    convert_unet2d(path | (config, state)) -> (UNet fields, params)   `unet2d.py` (DDPM layouts)
"""
from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder
from diffusion_jax.weights.diffusers.unet2d import convert_unet2d, unet2d_fields

__all__ = ["WeightsError", "read_folder", "convert_unet2d", "unet2d_fields"]
