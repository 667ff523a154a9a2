"""Runnable demonstrations (`python -m diffusion_jax.demos.<name>`)."""
