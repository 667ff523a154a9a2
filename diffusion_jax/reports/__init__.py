"""Plots and reports (matplotlib, headless): the top layer, never imported by the maths.

    plots.py    scatter panels, image grids, error-vs-NFE curves, loss curves, probe heat maps
    report.py   Report: tables + images -> report.md and a self-contained report.html
    metrics_writer.py   metrics.jsonl + TensorBoard event files without TensorFlow
"""
from diffusion_jax.reports.plots import (error_vs_nfe, image_grid, loss_curve, probe_heatmap,
                                         scatter_panels)
from diffusion_jax.reports.report import Report

__all__ = ["error_vs_nfe", "image_grid", "loss_curve", "probe_heatmap", "scatter_panels", "Report"]
