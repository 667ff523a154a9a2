"""PNG figures made by the library's own functions: sample scatters, image grids, error-vs-NFE curves,
readout-probe heat maps.

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through pyplot, so
importing this module leaves the user's backend alone (inline figures in notebooks keep working) and
no global figure state is created.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def _figure(figsize) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _subplots(figsize, nrow: int = 1, ncol: int = 1, **kw):
    fig = _figure(figsize)
    return fig, fig.subplots(nrow, ncol, **kw)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def scatter_panels(panels: dict[str, np.ndarray], path: str, *, lim: float | None = None, title: str = "") -> str:
    """One 2-D scatter per named sample set (N, 2), side by side, on shared axes."""
    n = len(panels)
    ncol = min(n, 5)
    nrow = int(math.ceil(n / ncol))
    fig, axes = _subplots((2.6 * ncol, 2.8 * nrow), nrow, ncol, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    allpts = np.concatenate([np.asarray(v)[:, :2] for v in panels.values()])
    lim = lim or float(np.percentile(np.abs(allpts), 99.5)) * 1.1
    for ax, (name, pts) in zip(axes.flat, panels.items()):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, lw=0)
        ax.set_title(name, fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def image_grid(images: np.ndarray, path: str, *, ncol: int | None = None, value_range=(-1.0, 1.0)) -> str:
    """Saves (N, H, W, C) images (C = 1 or 3) in value_range as one PNG grid."""
    images = np.asarray(images, np.float32)
    lo, hi = value_range
    images = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = images[i]
    fig = _figure((grid.shape[1] / 40, grid.shape[0] / 40))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.axis("off")
    return _save(fig, path)


def error_vs_nfe(curves: dict[str, tuple[list, list]], path: str, *, ylabel: str = "error", title: str = "") -> str:
    """Log-log error-vs-NFE curves, one line per sampler: curves[name] = (nfes, errors)."""
    fig, ax = _subplots((5, 3.6))
    for name, (nfe, err) in curves.items():
        ax.loglog(nfe, err, marker="o", ms=3, label=name)
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def loss_curve(metrics_jsonl: str, path: str, *, key: str = "loss", smooth: int = 5) -> str:
    """Plots `key` against `step` from a metrics JSONL file (raw and a running mean over `smooth` logs)."""
    import json

    steps, vals = [], []
    with open(metrics_jsonl) as f:
        for line in f:
            rec = json.loads(line)
            k = key if key in rec else f"train/{key}"
            if k in rec and "step" in rec:
                steps.append(rec["step"])
                vals.append(rec[k])
    if not steps:
        raise ValueError(f"no {key!r} records in {metrics_jsonl}")
    vals = np.asarray(vals, np.float64)
    fig, ax = _subplots((5, 3.2))
    ax.plot(steps, vals, lw=0.6, alpha=0.4, label=key)
    if len(vals) >= smooth:
        run = np.convolve(vals, np.ones(smooth) / smooth, mode="valid")
        ax.plot(steps[smooth - 1:], run, lw=1.5, label=f"mean of {smooth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def probe_heatmap(result_or_grid, timesteps=None, blocks=None, path: str | None = None, *,
                  title: str = "", method: str | None = None) -> str:
    """Heat map of a (t, block) readout accuracy grid (T, nB): one annotated cell each, the best
    cell outlined. Takes a `readouts.SweepResult` (timesteps / blocks from it; `method` picks the
    grid, default its first) or a bare grid with `timesteps` and `blocks`."""
    if path is None:
        raise ValueError("probe_heatmap needs path=<output .png>")
    if hasattr(result_or_grid, "grid"):
        grid = result_or_grid.grid(method)
        timesteps = result_or_grid.timesteps if timesteps is None else timesteps
        blocks = result_or_grid.blocks if blocks is None else blocks
        method = method or result_or_grid.methods[0]
    else:
        grid = result_or_grid
    grid = np.asarray(grid, np.float64)
    if timesteps is None or blocks is None:
        raise ValueError("a bare grid needs timesteps= and blocks=")
    if grid.shape != (len(timesteps), len(blocks)):
        raise ValueError(f"grid has shape {grid.shape}; expected (len(timesteps), len(blocks)) = "
                         f"({len(timesteps)}, {len(blocks)})")
    fig, ax = _subplots((0.6 * len(blocks) + 2.0, 0.45 * len(timesteps) + 1.4))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    mid = 0.5 * (np.nanmin(grid) + np.nanmax(grid))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if grid[i, j] > mid else "white")
    i, j = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(list(blocks), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(timesteps)))
    ax.set_yticklabels([f"{float(t):.3g}" for t in timesteps], fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("t")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"{method or ''} accuracy".strip())
    ax.set_title(title or f"best: t={float(timesteps[i]):.3g}, {blocks[j]} ({grid[i, j]:.3f})",
                 fontsize=9)
    return _save(fig, path)
