"""Gaussian VAE pieces of latent diffusion's first stage (Rombach et al. 2022) and of LSGM.

    DiagonalGaussian(mean, logvar)   q(z|x) = N(mean, diag(exp(logvar))), logvar clipped to [-30, 20]
                                     as LDM's / diffusers' DiagonalGaussianDistribution
      .sample(key)                   mean + exp(logvar/2) eps,  eps ~ N(0, I)
      .kl()                          KL(q || N(0, I)) = 1/2 sum (mean^2 + exp(logvar) - 1 - logvar)   (B,)
      .kl_to(other)                  KL(q || p) = 1/2 sum (logvar_p - logvar_q - 1
                                         + exp(logvar_q - logvar_p) + (mean_q - mean_p)^2 exp(-logvar_p))  (B,)
      .nll(z)                        -log q(z) = 1/2 sum (log 2 pi + logvar + (z - mean)^2 exp(-logvar))   (B,)
      .entropy()                     1/2 sum (1 + log 2 pi + logvar)                                     (B,)
    first_stage_loss(x, x_rec, posterior, kl_weight=1e-6, reconstruction='l1', logvar=0.)
        LDM's `LPIPSWithDiscriminator` without LPIPS and without the patch GAN (perceptual-free):
        rec = |x - x_rec| ('l1') or (x - x_rec)^2 ('l2') per element;
        nll = rec / exp(logvar) + logvar (logvar: LDM's learned scalar output log-variance, init 0);
        loss = (1/B) sum nll + kl_weight (1/B) sum_b KL(q(z|x_b) || N(0, I)).
        (LDM sums over pixels and averages over the batch; kl_weight 1e-6 in its KL-f configs.)
    latent_scale_factor(z)           LDM's scale_by_std: 1 / std(z) over all elements of the first batch
                                     of latents (torch's unbiased std), so that scale * z has unit variance.

Maths layer: jax only.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.objectives.hybrid import normal_kl

Array = jax.Array

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
RECONSTRUCTIONS = ("l1", "l2")


def _per_example(a) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


class DiagonalGaussian(NamedTuple):
    """A diagonal Gaussian posterior N(mean, exp(logvar)) of per-example latents (B, ...)."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, mean, logvar, *, clip: bool = True) -> "DiagonalGaussian":
        """Checks the shapes; clips logvar to [-30, 20] as LDM (clip=False: as given)."""
        mean = jnp.asarray(mean, jnp.float32)
        logvar = jnp.asarray(logvar, jnp.float32)
        if mean.shape != logvar.shape:
            raise ValueError(f"posterior mean and logvar must have the same shape, got {mean.shape} "
                             f"and {logvar.shape}")
        if mean.ndim < 1:
            raise ValueError(f"posterior mean must have a batch axis, got shape {mean.shape}")
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX) if clip else logvar)

    @classmethod
    def from_params(cls, h, axis: int = -1) -> "DiagonalGaussian":
        """Splits an encoder output h (..., 2 D) into (mean, logvar) along `axis` (LDM's moments)."""
        if h.shape[axis] % 2:
            raise ValueError(f"encoder output must have an even size along axis {axis} "
                             f"(mean and logvar), got shape {h.shape}")
        mean, logvar = jnp.split(jnp.asarray(h, jnp.float32), 2, axis=axis)
        return cls.from_moments(mean, logvar)

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def mode(self) -> Array:
        return self.mean

    def sample(self, key, eps=None) -> Array:
        """z = mean + std eps, eps ~ N(0, I) from `key` (or the given eps)."""
        if eps is None:
            eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> Array:
        """KL(q || N(0, I)) per example (B,), nats."""
        return _per_example(normal_kl(self.mean, self.logvar, 0.0, 0.0))

    def kl_to(self, other: "DiagonalGaussian") -> Array:
        """KL(self || other) per example (B,), nats (closed form between diagonal Gaussians)."""
        return _per_example(normal_kl(self.mean, self.logvar, other.mean, other.logvar))

    def nll(self, z) -> Array:
        """-log N(z; mean, exp(logvar)) per example (B,)."""
        return _per_example(0.5 * (math.log(2.0 * math.pi) + self.logvar
                                   + jnp.square(z - self.mean) * jnp.exp(-self.logvar)))

    def entropy(self) -> Array:
        return _per_example(0.5 * (1.0 + math.log(2.0 * math.pi) + self.logvar))


def reconstruction_error(x, x_rec, kind: str = "l1") -> Array:
    """|x - x_rec| ('l1') or (x - x_rec)^2 ('l2'), elementwise, float32."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECONSTRUCTIONS}")
    x = jnp.asarray(x, jnp.float32)
    x_rec = jnp.asarray(x_rec, jnp.float32)
    if x.shape != x_rec.shape:
        raise ValueError(f"reconstruction shape {x_rec.shape} does not match the input shape {x.shape}")
    d = x - x_rec
    return jnp.abs(d) if kind == "l1" else jnp.square(d)


def first_stage_loss(x, x_rec, posterior: DiagonalGaussian, *, kl_weight: float = 1e-6,
                     reconstruction: str = "l1", logvar=0.0) -> tuple[Array, dict]:
    """LDM's KL-autoencoder loss without LPIPS and the discriminator (see the module docstring):
    (1/B) sum (rec / exp(logvar) + logvar) + kl_weight (1/B) sum_b KL_b. Returns (loss, aux) with aux
    {'rec': mean elementwise reconstruction error, 'nll', 'kl' (mean per example), 'mse'}."""
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
    rec = reconstruction_error(x, x_rec, reconstruction)
    logvar = jnp.asarray(logvar, jnp.float32)
    nll = jnp.mean(_per_example(rec / jnp.exp(logvar) + logvar))
    kl = jnp.mean(posterior.kl())
    loss = nll + kl_weight * kl
    mse = jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(x_rec, jnp.float32)))
    return loss, {"rec": jnp.mean(rec), "nll": nll, "kl": kl, "mse": mse}


def latent_scale_factor(z, *, min_std: float = 1e-8) -> Array:
    """LDM's scale_by_std: 1 / std(z) over every element of the batch z (unbiased, as torch.std of
    the flattened first batch); `min_std` guards a constant batch."""
    z = jnp.asarray(z, jnp.float32).reshape(-1)
    if z.shape[0] < 2:
        raise ValueError(f"latent_scale_factor needs at least 2 latent elements, got {z.shape[0]}")
    return 1.0 / jnp.maximum(jnp.std(z, ddof=1), min_std)
