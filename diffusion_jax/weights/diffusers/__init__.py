"""Converters of diffusers model folders (as the Hugging Face Hub stores them) to this library.

    read_folder(path) -> (config dict, {name: np.ndarray})     `folder.py`
"""
from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder

__all__ = ["WeightsError", "read_folder"]
