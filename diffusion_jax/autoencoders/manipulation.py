"""DiffAE's attribute manipulation: a linear classifier on NORMALISED latents gives, per attribute,
a direction w in z_n space, and an edit moves z along it (Preechakul et al. 2022, Sec. 5.3;
phizaz/diffae `manipulate.ipynb`, `experiment_classifier.py`):

    z_n = (z - mean) / std
    logit_k(z) = w_k . z_n + b_k                              (one-vs-rest / multi-label, sigmoid)
    manipulate(z, w, s) = std * (z_n + s sqrt(D) w / ||w||) + mean          (DiffAE: s = 0.3)

so an edit of scale s moves z_n by s sqrt(D) (a fraction s of the typical norm sqrt(D) of a
normalised latent) and changes logit_k by exactly s sqrt(D) ||w_k||.

Classifiers (`fit_linear_classifier`): 'logistic' minimises the mean binary cross-entropy
+ (l2 / 2) sum_k ||w_k||^2 by full-batch Adam in one `lax.scan` (DiffAE trains its linear head with
BCE); 'lda' is the closed form w_k = (S_w + ridge I)^{-1} (mu_k+ - mu_k-), S_w the pooled
within-class covariance, b_k = -w_k . (mu_k+ + mu_k-) / 2 + log(pi_k+ / pi_k-).

Labels: (N,) binary (bool or {0, 1}): one attribute, directions (D,); (N,) integer classes with
num_classes > 2: one-vs-rest, directions (K, D); (N, K) binary: K attributes (CelebA style),
directions (K, D).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from diffusion_jax.autoencoders.latent_sampler import check_stats, identity_stats
from diffusion_jax.autoencoders.latents import LatentStats, denormalize, fit_latent_stats, normalize

CLASSIFIERS = ("logistic", "lda")

__all__ = ["CLASSIFIERS", "LinearClassifier", "fit_linear_classifier", "attribute_direction",
           "manipulate"]


@struct.dataclass
class LinearClassifier:
    """logit_k(z) = w_k . normalize(z) + b_k; weights (K, D), bias (K,), the stats it normalises with.

    single=True: one binary attribute (K = 1), `logits` returns (N,) and `directions` (D,).
    """
    weights: jax.Array
    bias: jax.Array
    stats: LatentStats
    single: bool = struct.field(pytree_node=False, default=False)

    def logits(self, z) -> jax.Array:
        """(N, K) logits ((N,) when single) of latents z (N, D)."""
        check_stats(z, self.stats)
        out = normalize(z, self.stats) @ self.weights.T + self.bias
        return out[..., 0] if self.single else out

    @property
    def directions(self) -> jax.Array:
        """Unit directions w_k / ||w_k|| in normalised space, (K, D) ((D,) when single)."""
        d = self.weights / jnp.linalg.norm(self.weights, axis=-1, keepdims=True)
        return d[0] if self.single else d


def _targets(labels, n: int, num_classes: Optional[int]) -> tuple[np.ndarray, bool]:
    """(N, K) float {0, 1} targets and whether there is a single binary attribute."""
    y = np.asarray(labels)
    if y.shape[:1] != (n,):
        raise ValueError(f"labels must have one row per latent: z has N = {n}, labels have shape "
                         f"{y.shape}")
    if y.ndim == 2:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("(N, K) multi-label targets must be binary (bool or 0/1)")
        return y.astype(np.float32), False
    if y.ndim != 1:
        raise ValueError(f"labels must be (N,) or (N, K), got shape {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(y == np.round(y)):
            raise ValueError(f"labels must be integers or booleans, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got min {y.min()}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.max() >= k:
        raise ValueError(f"label {y.max()} out of range for num_classes={k}")
    if k <= 2:
        return (y == 1).astype(np.float32)[:, None], True
    return np.eye(k, dtype=np.float32)[y], False


def _check_classes(y: np.ndarray, single: bool):
    pos = y.sum(0)
    neg = y.shape[0] - pos
    for k in range(y.shape[1]):
        name = "the attribute" if single else f"class {k}"
        if pos[k] == 0:
            raise ValueError(f"{name} has no positive examples; cannot fit its direction")
        if neg[k] == 0:
            raise ValueError(f"{name} has no negative examples (every latent is positive); "
                             "cannot fit its direction")


def _fit_logistic(zn, y, num_steps: int, learning_rate: float, l2: float):
    """argmin_{W, b} mean BCE(sigmoid(zn W^T + b), y) + l2/2 ||W||^2 by full-batch Adam."""
    k, d = y.shape[1], zn.shape[1]
    prior = jnp.clip(jnp.mean(y, 0), 1e-6, 1 - 1e-6)
    params = {"w": jnp.zeros((k, d), jnp.float32), "b": jnp.log(prior) - jnp.log1p(-prior)}
    tx = optax.adam(learning_rate)

    def objective(p):
        logits = zn @ p["w"].T + p["b"]
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
        return bce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
        p, s = carry
        g = jax.grad(objective)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return params["w"], params["b"]


def _fit_lda(zn, y, ridge: float):
    """w_k = (S_w + ridge I)^{-1} (mu_k+ - mu_k-), b_k = -w_k.(mu_k+ + mu_k-)/2 + log(pi+/pi-)."""
    n, d = zn.shape

    def one(yk):
        npos = jnp.sum(yk)
        nneg = n - npos
        mu_p = yk @ zn / npos
        mu_n = (1.0 - yk) @ zn / nneg
        c = zn - jnp.where(yk[:, None] > 0, mu_p, mu_n)
        s_w = c.T @ c / (n - 2) + ridge * jnp.eye(d)
        w = jnp.linalg.solve(s_w, mu_p - mu_n)
        b = -w @ (mu_p + mu_n) / 2 + jnp.log(npos / nneg)
        return w, b

    return jax.vmap(one, in_axes=1)(y)


def fit_linear_classifier(z, labels, *, stats: Optional[LatentStats] = None,
                          num_classes: Optional[int] = None, method: str = "logistic",
                          num_steps: int = 500, learning_rate: float = 0.05, l2: float = 1e-4,
                          ridge: float = 1e-4) -> LinearClassifier:
    """A linear classifier on normalize(z, stats) (stats=None: fitted on z itself).

    method 'logistic' (num_steps full-batch Adam steps at learning_rate, L2 penalty l2) or 'lda'
    (closed form, covariance ridge). See the module docstring for the label formats.
    """
    if method not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {method!r}; expected one of {CLASSIFIERS}")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2:
        raise ValueError(f"z must be a (N, D) array of latents, got shape {z.shape}")
    y, single = _targets(labels, z.shape[0], num_classes)
    _check_classes(y, single)
    stats = fit_latent_stats(z) if stats is None else stats
    check_stats(z, stats)
    zn = normalize(z, stats)
    y = jnp.asarray(y)
    if method == "logistic":
        w, b = jax.jit(_fit_logistic, static_argnums=(2,))(zn, y, int(num_steps),
                                                           float(learning_rate), float(l2))
    else:
        w, b = jax.jit(_fit_lda)(zn, y, float(ridge))
    return LinearClassifier(weights=w, bias=b, stats=stats, single=single)


def attribute_direction(z, labels, *, stats: Optional[LatentStats] = None, **kw) -> jax.Array:
    """Unit attribute directions w / ||w|| in normalised-latent space: (D,) for one binary attribute,
    (K, D) for K classes / attributes (keywords as `fit_linear_classifier`)."""
    return fit_linear_classifier(z, labels, stats=stats, **kw).directions


def manipulate(z, direction, scale, stats: Optional[LatentStats] = None) -> jax.Array:
    """denormalize(normalize(z) + scale sqrt(D) w / ||w||) (DiffAE; scale 0.3 in the paper).

    z: (N, D) or (D,); direction w: (D,) in normalised space (any norm); scale: a float or an (N,)
    array (one scale per latent); stats=None: no normalisation (identity stats).
    """
    z = jnp.asarray(z, jnp.float32)
    w = jnp.asarray(direction, jnp.float32)
    d = z.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"direction must have shape ({d},) to edit latents of shape {z.shape}, got "
                         f"{w.shape} (pick one row of a (K, D) set of directions)")
    norm = jnp.linalg.norm(w)
    if not isinstance(norm, jax.core.Tracer) and not 0.0 < float(norm) < math.inf:
        raise ValueError(f"direction must be a finite non-zero vector, got norm {float(norm)}")
    stats = identity_stats(d) if stats is None else stats
    check_stats(z, stats)
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim > 0:
        if s.shape != z.shape[:-1]:
            raise ValueError(f"scale must be a float or one per latent {z.shape[:-1]}, got {s.shape}")
        s = s[..., None]
    return denormalize(normalize(z, stats) + s * math.sqrt(d) * w / norm, stats)
