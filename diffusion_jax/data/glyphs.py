"""Procedural "glyphs" images: a glyph class under nuisance factors, where raw pixels fail (numpy only).

Each image shows one glyph over a textured or gradient background with pixel noise. The class is the
glyph; everything else is a nuisance that moves the pixels much more than the class does, so a
linear read-out of the pixels (or of their principal components) is close to chance, while features
that are local and pooled (what a denoiser learns) can still tell the glyphs apart.

==========  =====  ==========================================================================
factor      type   meaning
==========  =====  ==========================================================================
glyph       int    index into ``GLYPH_NAMES`` (the class label)
scale       float  in [0, 1]: glyph half-size from ``S_MIN`` to ``S_MAX`` (x image size)
pos_x       float  in [0, 1]: glyph centre, left -> right (margin-limited: always inside)
pos_y       float  in [0, 1]: glyph centre, top -> bottom
rotation    float  in [0, 1]: angle from -``MAX_ANGLE`` to +``MAX_ANGLE`` (small, so that '+' and
                   'x' stay distinct classes)
hue         float  in [0, 1): the glyph colour's hue (HSV with saturation 0.8, value 1)
background  int    index into ``BACKGROUND_NAMES``: a linear gradient between two dark colours,
                   sinusoidal stripes (random orientation, frequency, phase), or smooth blobs
==========  =====  ==========================================================================

Pixel noise N(0, ``NOISE_STD``^2) (in [0, 1] units) is added before quantisation to uint8. Glyphs
are anti-aliased: coverage is supersampled 4x per axis. Backgrounds are kept darker (value <= 0.5)
than the glyphs (value 1), so the glyph is always visible.
"""
from __future__ import annotations

import numpy as np

GLYPH_NAMES = ("plus", "times", "ring", "triangle", "square", "heart")
BACKGROUND_NAMES = ("gradient", "stripes", "blobs")
FACTOR_NAMES = ("glyph", "scale", "pos_x", "pos_y", "rotation", "hue", "background")
DISCRETE_FACTORS = {"glyph": len(GLYPH_NAMES), "background": len(BACKGROUND_NAMES)}
S_MIN, S_MAX = 0.16, 0.26          # glyph half-size as a fraction of the image size
MAX_ANGLE = np.deg2rad(15.0)
NOISE_STD = 0.04
SUPERSAMPLE = 4

_TRI_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([-90.0, 30.0, 150.0])])


def _heart(u, v):
    u, v = 1.15 * u, 1.15 * v + 0.15
    a = u * u + v * v - 1.0
    return a * a * a <= u * u * v * v * v


def _inside(glyph: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local points (u right, v up; unit = the glyph's half-size)."""
    if glyph in (0, 1):                       # plus; times = plus turned by 45 degrees
        if glyph == 1:
            u, v = (u + v) / np.sqrt(2.0), (v - u) / np.sqrt(2.0)
        arm, length = 0.26, 0.95
        return ((np.abs(u) <= arm) & (np.abs(v) <= length)) | ((np.abs(v) <= arm) & (np.abs(u) <= length))
    if glyph == 2:                            # ring
        r2 = u * u + v * v
        return (r2 <= 0.95 ** 2) & (r2 >= 0.55 ** 2)
    if glyph == 3:                            # equilateral triangle, point up
        m = u * _TRI_NORMALS[0, 0] + v * _TRI_NORMALS[0, 1] <= 0.5
        for nx, ny in _TRI_NORMALS[1:]:
            m &= u * nx + v * ny <= 0.5
        return m
    if glyph == 4:                            # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    return _heart(u, v)


def sample_factors(rng: np.random.Generator, n: int) -> dict:
    """n factor tuples, uniform (ints for the discrete factors)."""
    f = {k: rng.random(n).astype(np.float32) for k in ("scale", "pos_x", "pos_y", "rotation", "hue")}
    f["glyph"] = rng.integers(0, len(GLYPH_NAMES), n).astype(np.int32)
    f["background"] = rng.integers(0, len(BACKGROUND_NAMES), n).astype(np.int32)
    return f


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB in [0, 1] (h in [0, 1))."""
    h6 = (np.asarray(h, np.float64) % 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
                      np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1)])
    return table[i, np.arange(len(i))]


def _backgrounds(rng: np.random.Generator, kinds: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W, 3) float in [0, 0.5]: one background per image of the given kinds."""
    n = len(kinds)
    yy, xx = np.meshgrid((np.arange(resolution) + 0.5) / resolution,
                         (np.arange(resolution) + 0.5) / resolution, indexing="ij")
    c0 = _hsv_to_rgb(rng.random(n), rng.uniform(0.3, 0.9, n), rng.uniform(0.05, 0.5, n))
    c1 = _hsv_to_rgb(rng.random(n), rng.uniform(0.3, 0.9, n), rng.uniform(0.05, 0.5, n))
    theta = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy       # (N, H, W)
    gradient = (proj - proj.min((1, 2), keepdims=True)) / np.ptp(proj, axis=(1, 2), keepdims=True)
    freq = rng.uniform(2.0, 6.0, n)[:, None, None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    blobs = np.zeros((n, resolution, resolution))
    for _ in range(4):
        cx, cy = rng.random((2, n))[..., None, None]
        w = rng.uniform(0.1, 0.3, n)[:, None, None]
        blobs += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w))
    blobs = blobs / blobs.max((1, 2), keepdims=True)
    mix = np.where((kinds == 0)[:, None, None], gradient, np.where((kinds == 1)[:, None, None], stripes, blobs))
    return (1 - mix)[..., None] * c0[:, None, None, :] + mix[..., None] * c1[:, None, None, :]


def glyph_geometry(factors: dict, resolution: int):
    """(cx, cy, half_size, angle) in pixel units / radians."""
    half = resolution * (S_MIN + np.asarray(factors["scale"]) * (S_MAX - S_MIN))
    margin = resolution * S_MAX + 1.0
    span = resolution - 2 * margin
    cx = margin + np.asarray(factors["pos_x"]) * span
    cy = margin + np.asarray(factors["pos_y"]) * span
    angle = (2 * np.asarray(factors["rotation"]) - 1) * MAX_ANGLE
    return cx, cy, half, angle


def render_alpha(factors: dict, resolution: int, chunk: int = 512) -> np.ndarray:
    """Anti-aliased glyph coverage (N, H, W) float32 in [0, 1]."""
    n = len(factors["glyph"])
    cx, cy, half, angle = glyph_geometry(factors, resolution)
    ss = SUPERSAMPLE
    sub = (np.arange(resolution * ss) + 0.5) / ss
    out = np.zeros((n, resolution, resolution), np.float32)
    glyphs = np.asarray(factors["glyph"])
    for g in np.unique(glyphs):
        idx_all = np.flatnonzero(glyphs == g)
        for s in range(0, len(idx_all), chunk):
            idx = idx_all[s:s + chunk]
            dx = (sub[None, None, :] - cx[idx, None, None])
            dy = -(sub[None, :, None] - cy[idx, None, None])
            c, si, h = (a[idx, None, None] for a in (np.cos(angle), np.sin(angle), half))
            u = (c * dx + si * dy) / h
            v = (-si * dx + c * dy) / h
            m = _inside(int(g), u.astype(np.float32), v.astype(np.float32))
            out[idx] = m.reshape(len(idx), resolution, ss, resolution, ss).mean(axis=(2, 4), dtype=np.float32)
    return out


def render(factors: dict, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3): background (its colours, orientation and phase drawn from `rng`),
    the glyph in its colour over it, pixel noise."""
    alpha = render_alpha(factors, resolution)[..., None]
    n = len(alpha)
    bg = _backgrounds(rng, np.asarray(factors["background"]), resolution)
    color = _hsv_to_rgb(np.asarray(factors["hue"]), np.full(n, 0.8), np.ones(n))[:, None, None, :]
    img = (1 - alpha) * bg + alpha * color + rng.normal(0.0, NOISE_STD, bg.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
