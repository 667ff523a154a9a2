"""Plots and reports (matplotlib, headless): the top layer, never imported by the maths."""
from diffusion_jax.reports.plots import error_vs_nfe, image_grid, loss_curve, scatter_panels

__all__ = ["error_vs_nfe", "image_grid", "loss_curve", "scatter_panels"]
