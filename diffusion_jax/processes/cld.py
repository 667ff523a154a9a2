"""Critically-damped Langevin diffusion (CLD; Dockhorn, Vahdat & Kreis, ICLR 2022, nv-tlabs/CLD-SGM).

The data x is coupled to a velocity v of the same shape and the pair u = (x, v) diffuses in phase space:

    dx = M^-1 beta(t) v dt,
    dv = (-beta(t) x - Gamma M^-1 beta(t) v) dt + sqrt(2 Gamma beta(t)) dW,       Gamma^2 = 4 M,

with critical damping Gamma = 2 sqrt(M) and beta(t) = beta0 + beta1 t (nv-tlabs/CLD-SGM
`util/utils.build_beta_fn`: beta1 is a SLOPE, not an end value; the paper's CIFAR-10 run uses
beta0 = 4, beta1 = 0, i.e. a constant beta = 4, with M^-1 = 4 and gamma = 0.04). Noise enters v only.
The stationary law (the prior at t = 1) is N(0, I) x N(0, M I). The data start with v0 ~ N(0, gamma M I).

Every coordinate evolves as the same 2x2 linear SDE du = beta(t) A u dt + G dW, A = [[0, 1/M], [-1, -Gamma/M]],
G = diag(0, sqrt(2 Gamma beta)). With c = 2/Gamma, A has the double eigenvalue -c (critical damping), so
with the integrated rate B = int_0^t beta = beta0 t + beta1 t^2/2 and y = 2 c B = 4 B / Gamma:

    Phi(B) = exp(B A) = e^{-cB} [[1 + cB, (4/Gamma^2) B], [-B, 1 - cB]]                (kernel mean)
    Q(B) = int_0^B e^{bA} diag(0, 2 Gamma) e^{bA^T} db                                 (noise covariance)
      Q_xx = e^{-y} (e^y - 1 - y - y^2/2),  Q_xv = (Gamma/4) y^2 e^{-y},
      Q_vv = (Gamma^2/4) (1 - e^{-y} + e^{-y} (y - y^2/2)),
      det Q = Gamma^2 e^{-y} (sinh^2(y/2) - (y/2)^2),

the same numbers as the official `sde_lib.CLD.mean` / `var` (there with f = Gamma, g = 1/Gamma), written so
that no float32 cancellation occurs at small t (series for e^y - 1 - y - y^2/2 and sinh z - z). For ANY initial
2x2 covariance Sigma_0 = [[var0x, cov0xv], [cov0xv, var0v]] of (x0, v0) the perturbation kernel is

    u_t | u_0 ~ N(Phi u_0, Sigma_t),     Sigma_t = Phi Sigma_0 Phi^T + Q,
    det Sigma_t = det(Phi)^2 det Sigma_0 + det Q + tr(adj(Phi Sigma_0 Phi^T) Q),   det Phi = e^{-y},

per coordinate, with Cholesky factor L_t = [[l_xx, 0], [l_vx, l_vv]], l_xx = sqrt(S_xx), l_vx = S_xv / l_xx,
l_vv = sqrt(det Sigma_t / S_xx) (the paper's ell_vv; the official `noise_multiplier` is -1/l_vv).
Hybrid score matching conditions on x0 only: var0x = 0, v0 marginalised (var0v = gamma M, the default).

Reverse-time sampling (SSCS) uses the same closed forms for the linear part run backwards in time with
the Hamiltonian part flipped, i.e. the process conjugated by v -> -v: Phi_rev = S Phi S, Q_rev = S Q S,
S = diag(1, -1) (`transition(B, reverse=True)`).

The phase-space state is a pair (x, v) of arrays shaped like the data; methods are pure jnp functions,
the dataclass is frozen and hashable (a static argument to `jax.jit`). Not a scalar alpha/sigma process,
so it does not subclass `Process` and is not in `processes.PROCESSES` (whose members the scalar samplers,
likelihood and config objectives all assume); `processes.get_process('cld', ...)` builds it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes.base import as_time, bcast

Array = jax.Array
_SERIES_H3 = [1.0 / math.factorial(k) for k in range(3, 16)]          # e^y - 1 - y - y^2/2
_SERIES_SINH = [1.0 / math.factorial(2 * k + 1) for k in range(1, 9)]  # sinh z - z


class Transition(NamedTuple):
    """Phi = [[pxx, pxv], [pvx, pvv]] and the noise covariance Q = [[qxx, qxv], [qxv, qvv]] with det Q."""

    pxx: Array
    pxv: Array
    pvx: Array
    pvv: Array
    qxx: Array
    qxv: Array
    qvv: Array
    qdet: Array


class Cov2(NamedTuple):
    """A per-coordinate 2x2 covariance [[xx, xv], [xv, vv]], its determinant and its Cholesky factor
    L = [[lxx, 0], [lvx, lvv]] (Sigma = L L^T)."""

    xx: Array
    xv: Array
    vv: Array
    det: Array
    lxx: Array
    lvx: Array
    lvv: Array


def _horner(coefs, var):
    """sum_k coefs[k] var^k (Horner)."""
    acc = jnp.zeros_like(var)
    for c in reversed(coefs):
        acc = acc * var + c
    return acc


def _e_h3(y):
    """e^{-y} (e^y - 1 - y - y^2/2) = 1 - e^{-y}(1 + y + y^2/2), without cancellation at small y."""
    small = y < 1.0
    ys = jnp.where(small, y, 0.0)
    series = jnp.exp(-ys) * ys ** 3 * _horner(_SERIES_H3, ys)
    yl = jnp.where(small, 1.0, y)
    direct = -jnp.expm1(-yl) - jnp.exp(-yl) * (yl + 0.5 * yl * yl)
    return jnp.where(small, series, direct)


def _e_sinh2_minus_z2(z):
    """e^{-2z} (sinh^2 z - z^2) without cancellation (series for sinh z - z at z < 1)."""
    small = z < 1.0
    zs = jnp.where(small, z, 0.0)
    s_minus = zs ** 3 * _horner(_SERIES_SINH, zs * zs)
    series = jnp.exp(-2.0 * zs) * s_minus * (s_minus + 2.0 * zs)
    zl = jnp.where(small, 1.0, z)
    half = -0.5 * jnp.expm1(-2.0 * zl)          # e^{-z} sinh z
    direct = half * half - zl * zl * jnp.exp(-2.0 * zl)
    return jnp.where(small, series, direct)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclasses.dataclass(frozen=True)
class CLD:
    """Critically-damped Langevin diffusion on t in [t_min, t_max] (data at t = 0).

    m_inv: M^-1 (the paper's CIFAR-10 value 4); gamma: v0 ~ N(0, gamma M) (0.04); beta(t) = beta0 + beta1 t
    (4, 0); damping: Gamma, None for the critical value 2 sqrt(M) (anything else must equal it: the
    closed forms assume critical damping); t_min: the end of sampling (the official sampling_eps 1e-3).
    """

    m_inv: float = 4.0
    gamma: float = 0.04
    beta0: float = 4.0
    beta1: float = 0.0
    damping: Optional[float] = None
    t_min: float = 1e-3
    t_max: float = 1.0
    name = "cld"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the field for a mass, damping, gamma, beta or time range that is invalid or
        that breaks critical damping Gamma^2 = 4 M."""
        for f in ("m_inv", "gamma", "beta0", "beta1", "t_min", "t_max"):
            if not _is_real(getattr(self, f)):
                raise ValueError(f"{f} of a CLD process must be a finite real number, got {getattr(self, f)!r}")
        if not self.m_inv > 0:
            raise ValueError(f"m_inv (the inverse mass M^-1) of a CLD process must be > 0, got {self.m_inv!r}")
        if self.damping is not None:
            if not _is_real(self.damping) or not self.damping > 0:
                raise ValueError(f"damping (Gamma) of a CLD process must be a positive real or None "
                                 f"(critical: 2 sqrt(M)), got {self.damping!r}")
            four_m = 4.0 / self.m_inv
            if abs(self.damping ** 2 - four_m) > 1e-6 * four_m:
                raise ValueError(
                    f"m_inv: the mass M = 1/m_inv = {1.0 / self.m_inv:g} with damping Gamma = {self.damping:g} "
                    f"breaks critical damping Gamma^2 = 4M (Gamma^2 = {self.damping ** 2:g}, 4M = {four_m:g}); "
                    f"set m_inv = 4/Gamma^2 = {4.0 / self.damping ** 2:g} or damping = None")
        if not self.gamma >= 0:
            raise ValueError(f"gamma (v0 ~ N(0, gamma M)) of a CLD process must be >= 0, got {self.gamma!r}")
        if not (self.beta0 > 0 and self.beta0 + self.beta1 > 0):
            raise ValueError(f"beta0, beta1: beta(t) = beta0 + beta1 t must be > 0 on [0, 1], got "
                             f"beta0={self.beta0!r}, beta1={self.beta1!r}")
        if not 0.0 <= self.t_min < self.t_max:
            raise ValueError(f"t_min, t_max of a CLD process need 0 <= t_min < t_max, got "
                             f"t_min={self.t_min!r}, t_max={self.t_max!r}")

    # --- constants ------------------------------------------------------------------------------
    @property
    def mass(self) -> float:
        return 1.0 / self.m_inv

    @property
    def big_gamma(self) -> float:
        """The friction Gamma = 2 sqrt(M) (critical damping)."""
        return 2.0 * math.sqrt(self.mass)

    @property
    def var0v(self) -> float:
        """Variance gamma M of the initial velocity v0."""
        return self.gamma * self.mass

    # --- schedule -------------------------------------------------------------------------------
    def beta(self, t) -> Array:
        """beta(t) = beta0 + beta1 t."""
        return self.beta0 + self.beta1 * as_time(t)

    def beta_int(self, t) -> Array:
        """B(t) = int_0^t beta = beta0 t + beta1 t^2 / 2."""
        t = as_time(t)
        return self.beta0 * t + 0.5 * self.beta1 * t * t

    # --- SDE -----------------------------------------------------------------------------------
    def drift(self, x, v, t) -> tuple[Array, Array]:
        """(M^-1 beta v, -beta x - Gamma M^-1 beta v)."""
        b = bcast(self.beta(t), x)
        return self.m_inv * b * v, -b * x - self.big_gamma * self.m_inv * b * v

    def g2(self, t) -> Array:
        """Squared diffusion of v: 2 Gamma beta(t) (x has none)."""
        return 2.0 * self.big_gamma * self.beta(t)

    # --- closed-form transitions ----------------------------------------------------------------
    def transition(self, b, reverse: bool = False) -> Transition:
        """Phi(B) and Q(B) (module docstring) for an integrated rate B >= 0; reverse=True gives the
        linear part of the reverse-time SDE (v -> -v conjugate: pxv, pvx, qxv change sign)."""
        gam = self.big_gamma
        c = 2.0 / gam
        b = as_time(b)
        y = 2.0 * c * b
        e = jnp.exp(-c * b)
        sgn = -1.0 if reverse else 1.0
        qxx = _e_h3(y)
        qxv = 0.25 * gam * y * y * jnp.exp(-y)
        qvv = 0.25 * gam * gam * (-jnp.expm1(-y) + jnp.exp(-y) * (y - 0.5 * y * y))
        qdet = gam * gam * _e_sinh2_minus_z2(0.5 * y)
        return Transition(e * (1.0 + c * b), sgn * e * (4.0 / gam ** 2) * b, -sgn * e * b, e * (1.0 - c * b),
                          qxx, sgn * qxv, qvv, qdet)

    def propagate(self, tr: Transition, var0x=0.0, var0v=None, cov0xv=0.0) -> Cov2:
        """Sigma = Phi Sigma_0 Phi^T + Q with its determinant and Cholesky factor (arrays broadcast)."""
        a = jnp.asarray(var0x, tr.pxx.dtype)
        bb = jnp.asarray(self.var0v if var0v is None else var0v, tr.pxx.dtype)
        c = jnp.asarray(cov0xv, tr.pxx.dtype)
        pxx = tr.pxx ** 2 * a + 2.0 * tr.pxx * tr.pxv * c + tr.pxv ** 2 * bb
        pxv = tr.pxx * tr.pvx * a + (tr.pxx * tr.pvv + tr.pxv * tr.pvx) * c + tr.pxv * tr.pvv * bb
        pvv = tr.pvx ** 2 * a + 2.0 * tr.pvx * tr.pvv * c + tr.pvv ** 2 * bb
        det_phi = tr.pxx * tr.pvv - tr.pxv * tr.pvx
        det = det_phi ** 2 * (a * bb - c * c) + tr.qdet + (pvv * tr.qxx - 2.0 * pxv * tr.qxv + pxx * tr.qvv)
        xx, xv, vv = pxx + tr.qxx, pxv + tr.qxv, pvv + tr.qvv
        tiny = jnp.finfo(xx.dtype).tiny
        lxx = jnp.sqrt(jnp.maximum(xx, tiny))
        lvx = xv / lxx
        lvv = jnp.sqrt(jnp.maximum(det, 0.0) / jnp.maximum(xx, tiny))
        return Cov2(xx, xv, vv, det, lxx, lvx, lvv)

    def kernel_cov(self, t, var0x=0.0, var0v=None, cov0xv=0.0) -> Cov2:
        """The per-coordinate covariance Sigma_t of u_t given the initial 2x2 covariance (var0x, cov0xv,
        var0v); defaults: x0 known, v0 ~ N(0, gamma M) marginalised (the HSM kernel)."""
        return self.propagate(self.transition(self.beta_int(t)), var0x, var0v, cov0xv)

    def kernel_mean(self, x0, v0, t) -> tuple[Array, Array]:
        """Phi(B(t)) (x0, v0): the kernel mean (v0 = 0 for the HSM kernel)."""
        tr = self.transition(self.beta_int(t))
        p = [bcast(q, x0) for q in tr[:4]]
        return p[0] * x0 + p[1] * v0, p[2] * x0 + p[3] * v0

    def marginal_prob(self, x0, t, var0x=0.0, var0v=None) -> tuple[tuple[Array, Array], Cov2]:
        """((mean_x, mean_v), Sigma_t) of q(u_t | x0) with v0 marginalised (mean at v0 = 0)."""
        mean = self.kernel_mean(x0, jnp.zeros_like(x0), t)
        return mean, self.kernel_cov(t, var0x, var0v)

    def perturb(self, x0, t, eps_x, eps_v, v0=None, var0x=0.0, var0v=None) -> tuple[Array, Array]:
        """u_t = mean + L_t eps: x_t = m_x + l_xx eps_x, v_t = m_v + l_vx eps_x + l_vv eps_v.

        v0=None: the HSM kernel (v0 marginalised, variance var0v = gamma M); given v0 (DSM) pass var0v=0."""
        v0 = jnp.zeros_like(x0) if v0 is None else v0
        mx, mv = self.kernel_mean(x0, v0, t)
        cov = self.kernel_cov(t, var0x, var0v)
        lxx, lvx, lvv = (bcast(q, x0) for q in (cov.lxx, cov.lvx, cov.lvv))
        return mx + lxx * eps_x, mv + lvx * eps_x + lvv * eps_v

    # --- prior ---------------------------------------------------------------------------------
    def prior_sample(self, key, shape, dtype=jnp.float32) -> tuple[Array, Array]:
        """(x, v) ~ N(0, I) x N(0, M I), each of `shape`."""
        kx, kv = jax.random.split(key)
        return (jax.random.normal(kx, shape, dtype),
                math.sqrt(self.mass) * jax.random.normal(kv, shape, dtype))

    def prior_logp(self, x, v) -> Array:
        """log N(x; 0, I) + log N(v; 0, M I), summed over all but the batch axis."""
        d = np.prod(x.shape[1:])
        sx = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, -1)
        sv = jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, -1)
        return (-0.5 * d * math.log(2 * math.pi) - 0.5 * sx
                - 0.5 * d * math.log(2 * math.pi * self.mass) - 0.5 * sv / self.mass)

    def v0_logp(self, v0) -> Array:
        """log N(v0; 0, gamma M I) summed over all but the batch axis (the initial-velocity law)."""
        d = np.prod(v0.shape[1:])
        s = jnp.sum(jnp.reshape(v0, (v0.shape[0], -1)) ** 2, -1)
        return -0.5 * d * math.log(2 * math.pi * self.var0v) - 0.5 * s / self.var0v

    def v0_entropy(self, d: int) -> float:
        """Entropy of N(0, gamma M I_d): (d/2) log(2 pi e gamma M)."""
        return 0.5 * d * math.log(2 * math.pi * math.e * self.var0v)

    # --- helpers ------------------------------------------------------------------------------
    def check_t(self, t, what: str = "t") -> None:
        """ValueError if a concrete t lies outside [t_min, t_max] (no-op under tracing)."""
        if isinstance(t, jax.core.Tracer):
            return
        arr = np.asarray(t, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} must be finite, got {arr}")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < self.t_min - 1e-6 or hi > self.t_max + 1e-6:
            raise ValueError(f"{what} outside the time range of {self.describe()}: got values in "
                             f"[{lo:g}, {hi:g}], allowed [{self.t_min:g}, {self.t_max:g}]")

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"CLD({fields})"


def concat_phase(x, v) -> Array:
    """The network input: x and v concatenated along the last (channel) axis, (..., 2C)."""
    return jnp.concatenate([x, v], axis=-1)


def split_phase(u) -> tuple[Array, Array]:
    """Inverse of `concat_phase`."""
    c = u.shape[-1] // 2
    return u[..., :c], u[..., c:]


__all__ = ["CLD", "Cov2", "Transition", "concat_phase", "split_phase"]
