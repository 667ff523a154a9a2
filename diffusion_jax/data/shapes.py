"""Procedural "shapes" images with known generative factors (numpy only).

Each image shows one shape on a black background. Generative factors:

==========  =====  ==========================================================
factor      type   meaning
==========  =====  ==========================================================
shape       int    index into ``SHAPE_NAMES`` (square, circle, triangle, heart)
scale       float  in [0, 1]: shape radius from ``R_MIN`` to ``R_MAX`` (x size)
pos_x       float  in [0, 1]: area centroid, left -> right (margin-limited)
pos_y       float  in [0, 1]: area centroid, top -> bottom (margin-limited)
rotation    float  in [0, 1): angle ``2*pi*rotation``, counter-clockwise.
                   Ambiguous up to the shape's symmetry (none for the circle,
                   1/4 for the square, 1/3 for the triangle), as in dSprites.
color       int    index into ``PALETTE`` (RGB uint8)
==========  =====  ==========================================================

Rendering is anti-aliased: the shape is supersampled inside its bounding box
(``supersample_factor`` x per axis) and box-averaged to a coverage ``alpha`` in
[0, 1]; the pixel is ``round(alpha * colour)``, so fully covered pixels equal
the colour exactly. Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` in pixel coordinates;
``factors_to_pixels`` gives the centre/radius in those units. Every shape lies
fully inside the frame for all factor values.
"""

from __future__ import annotations

import numpy as np

SHAPE_NAMES = ("square", "circle", "triangle", "heart")
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240],
     [245, 220, 40], [230, 50, 220], [40, 225, 235]], dtype=np.uint8)
FACTOR_NAMES = ("shape", "scale", "pos_x", "pos_y", "rotation", "color")
DISCRETE_FACTORS = {"shape": len(SHAPE_NAMES), "color": len(COLOR_NAMES)}

R_MIN, R_MAX = 0.12, 0.25  # shape (circum)radius as a fraction of image size


def supersample_factor(resolution: int) -> int:
  """Sub-samples per pixel axis: 4 up to 32px, 3 above (keeps 64px fast)."""
  return 4 if resolution <= 32 else 3


def _heart_inside(u, v):
  """Raw heart curve (x^2+y^2-1)^3 - x^2 y^3 <= 0 (y pointing up)."""
  u2, a = u * u, u * u + v * v - 1.0
  return a * a * a <= u2 * v * v * v


def _heart_normalisation():
  """Centroid and circumradius of the raw heart (computed once, ~ms)."""
  g = np.linspace(-1.5, 1.5, 601)
  u, v = np.meshgrid(g, g)
  m = _heart_inside(u, v)
  cu, cv = u[m].mean(), v[m].mean()
  return cu, cv, np.sqrt((u[m] - cu) ** 2 + (v[m] - cv) ** 2).max()


_HEART_CU, _HEART_CV, _HEART_R = _heart_normalisation()
# Outward edge normals of an equilateral triangle with circumradius 1 (point up,
# y up): inradius 0.5.
_TRI_NORMALS = np.array([[np.cos(a), np.sin(a)]
                         for a in np.deg2rad([-90.0, 30.0, 150.0])])


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Membership of local points (u right, v up; unit = circumradius)."""
  if shape == 0:  # square
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7
  if shape == 1:  # circle
    return u * u + v * v <= 0.85 ** 2
  if shape == 2:  # equilateral triangle, centroid at the origin
    m = u * _TRI_NORMALS[0, 0] + v * _TRI_NORMALS[0, 1] <= 0.5
    for nx, ny in _TRI_NORMALS[1:]:
      m &= u * nx + v * ny <= 0.5
    return m
  s = np.float32(_HEART_R)  # heart, centred on its area centroid
  return _heart_inside(u * s + np.float32(_HEART_CU),
                       v * s + np.float32(_HEART_CV))


def factors_to_pixels(factors: dict, resolution: int):
  """Returns ``(cx, cy, radius)`` in pixel units for the given factors."""
  r = resolution * (R_MIN + np.asarray(factors["scale"]) * (R_MAX - R_MIN))
  margin = resolution * R_MAX + 1.5
  span = resolution - 2 * margin
  cx = margin + np.asarray(factors["pos_x"]) * span
  cy = margin + np.asarray(factors["pos_y"]) * span
  return cx, cy, r


def sample_factors(rng: np.random.Generator, n: int) -> dict:
  """Samples ``n`` factor tuples uniformly (ints for discrete factors)."""
  f = {k: rng.random(n).astype(np.float32)
       for k in ("scale", "pos_x", "pos_y", "rotation")}
  f["shape"] = rng.integers(0, len(SHAPE_NAMES), n).astype(np.int32)
  f["color"] = rng.integers(0, len(COLOR_NAMES), n).astype(np.int32)
  return f


def render_alpha(factors: dict, resolution: int, chunk: int = 256) -> np.ndarray:
  """Anti-aliased coverage maps ``(N, H, W)`` float32 in [0, 1]."""
  n = len(factors["shape"])
  cx, cy, r = factors_to_pixels(factors, resolution)
  box = int(np.ceil(2 * resolution * R_MAX)) + 2
  x0 = np.clip(np.floor(cx - box / 2).astype(int), 0, resolution - box)
  y0 = np.clip(np.floor(cy - box / 2).astype(int), 0, resolution - box)
  ss = supersample_factor(resolution)
  sub = (np.arange(box * ss) + 0.5) / ss  # sub-pixel centres within the box
  out = np.zeros((n, resolution, resolution), np.float32)
  theta = 2 * np.pi * np.asarray(factors["rotation"], np.float64)
  shapes = np.asarray(factors["shape"])
  for shp in np.unique(shapes):
    idx_all = np.flatnonzero(shapes == shp)
    for s in range(0, len(idx_all), chunk):
      idx = idx_all[s:s + chunk]
      dx = (x0[idx, None] + sub[None] - cx[idx, None])[:, None, :]  # (B,1,X)
      dy = -(y0[idx, None] + sub[None] - cy[idx, None])[:, :, None]  # (B,Y,1)
      c, si, rr = (a[idx, None, None] for a in (np.cos(theta), np.sin(theta), r))
      u = (c * dx + si * dy) / rr  # rotate by -theta into the shape frame
      v = (-si * dx + c * dy) / rr
      m = _inside(int(shp), u.astype(np.float32), v.astype(np.float32))
      alpha = m.reshape(-1, box, ss, box, ss).mean(axis=(2, 4), dtype=np.float32)
      for k, i in enumerate(idx):
        out[i, y0[i]:y0[i] + box, x0[i]:x0[i] + box] = alpha[k]
  return out


def render(factors: dict, resolution: int) -> np.ndarray:
  """Renders uint8 RGB images ``(N, H, W, 3)`` for the given factors."""
  alpha = render_alpha(factors, resolution)
  rgb = PALETTE[np.asarray(factors["color"])].astype(np.float32)
  return np.rint(alpha[..., None] * rgb[:, None, None, :]).astype(np.uint8)
