"""Converters of diffusers model folders (as the Hugging Face Hub stores them) to this library.

    read_folder(path) -> (config dict, {name: np.ndarray})     `folder.py`
    convert_unet2d(path | (config, state)) -> (UNet fields, params)   `unet2d.py` (DDPM layouts)
    load_autoencoder_kl(path) -> (AutoencoderKL, params)       `autoencoder_kl.py` (SD VAE)
    load_dit(path) -> (DiT, params)                            `dit.py` (DiTTransformer2DModel)
    load_latent_dit(dit_path, vae_path) -> LatentDiT;  sample_latent_dit(model, labels, key)
                                                               `latent_dit.py` (end to end)
"""
from diffusion_jax.weights.diffusers.folder import WeightsError, read_folder
from diffusion_jax.weights.diffusers.unet2d import convert_unet2d, unet2d_fields
from diffusion_jax.weights.diffusers.autoencoder_kl import (autoencoder_kl_fields,
                                                            convert_autoencoder_kl,
                                                            load_autoencoder_kl)
from diffusion_jax.weights.diffusers.dit import convert_dit, dit_fields, load_dit
from diffusion_jax.weights.diffusers.latent_dit import (LatentDiT, load_latent_dit,
                                                        sample_latent_dit)

__all__ = ["WeightsError", "read_folder", "convert_unet2d", "unet2d_fields",
           "autoencoder_kl_fields", "convert_autoencoder_kl", "load_autoencoder_kl",
           "dit_fields", "convert_dit", "load_dit", "LatentDiT", "load_latent_dit",
           "sample_latent_dit"]
