"""Flow-matching interpolants (Lipman et al. 2023; Liu et al. 2023, rectified flow; Esser et al. 2024,
SD3) as processes on the library's marginal interface, data at t = 0 and noise at t = 1:

  linear   x_t = (1 - t) x_0 + t eps        alpha = 1 - t,          sigma = t
           lambda = 2 log((1 - t)/t),  t = 1 / (1 + exp(lambda/2)),
           f = -1/(1 - t),  g^2 = 2t + 2t^2/(1 - t) = 2t/(1 - t)
  cosine   alpha = cos(pi t/2), sigma = sin(pi t/2)   (SiT's 'GVP' path, Ma et al. 2024)
           lambda = 2 log cot(pi t/2),  t = (2/pi) arctan(exp(-lambda/2)),
           f = -(pi/2) tan(pi t/2),  g^2 = pi tan(pi t/2)

f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 are those of the equivalent SDE
dx = f x dt + g dw, whose probability-flow ODE drift f x + g^2/(2 sigma) eps_hat is the flow
velocity u = alpha' x_0 + sigma' eps (`predictions.flow_from_eps`; eps - x_0 on the linear path).
alpha vanishes at t = 1, so the range stops at t_max < 1 and the prior is N(0, sigma(t_max)^2 I)
(as the VE family: `variance_preserving = False`).

Time convention. Here (as in the diffusion literature and the SD3 paper) data sit at t = 0 and noise at
t = 1. Common PyTorch flow-matching code (facebookresearch/flow_matching, torchcfm, Lipman et al.'s and
Liu et al.'s notation) runs the other way: x_s = s x1 + (1 - s) x0 with noise x0 at s = 0 and data x1 at
s = 1, so s = 1 - t, and its target velocity x1 - x0 = -(eps - x0) is minus ours:
u_torch(x, s) = -u(x, 1 - s); samplers there integrate s from 0 up to 1, ours t from t_max down to t_min.
A network trained there is used here as `lambda x, t, c: -net(x, 1 - t, c)` with prediction 'flow'.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp

from diffusion_jax.processes.base import Process, as_time

FLOW_PATHS = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Flow(Process):
    """The flow-matching path `path` ('linear': rectified flow / SD3, or 'cosine') on [t_min, t_max],
    0 < t_min < t_max < 1. Besides the interface it has the closed-form rates `d_alpha`, `d_sigma`."""

    path: str = "linear"
    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3
    name = "flow"
    variance_preserving = False

    def __post_init__(self):
        if self.path not in FLOW_PATHS:
            raise ValueError(f"path: unknown flow path {self.path!r}; expected one of {FLOW_PATHS}")
        for field in ("t_min", "t_max"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < float(v) < 1.0:
                raise ValueError(f"{field} of a flow process must lie in (0, 1) (alpha = 0 at t = 1, "
                                 f"sigma = 0 at t = 0), got {v!r}")
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min must be below t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def _angle(self, t):
        return 0.5 * math.pi * as_time(t)

    # --- marginal -----------------------------------------------------------------------------
    def alpha(self, t):
        if self.path == "linear":
            return 1.0 - as_time(t)
        return jnp.cos(self._angle(t))

    def log_alpha(self, t):
        if self.path == "linear":
            return jnp.log1p(-as_time(t))
        return jnp.log(jnp.cos(self._angle(t)))

    def sigma(self, t):
        if self.path == "linear":
            return as_time(t)
        return jnp.sin(self._angle(t))

    def log_snr(self, t):
        if self.path == "linear":
            t = as_time(t)
            return 2.0 * (jnp.log1p(-t) - jnp.log(t))
        return -2.0 * jnp.log(jnp.tan(self._angle(t)))

    def t_from_log_snr(self, lam):
        lam = as_time(lam)
        if self.path == "linear":
            return 1.0 / (1.0 + jnp.exp(0.5 * lam))
        return (2.0 / math.pi) * jnp.arctan(jnp.exp(-0.5 * lam))

    # --- rates and SDE -------------------------------------------------------------------------
    def d_alpha(self, t):
        """d alpha / dt."""
        if self.path == "linear":
            return -jnp.ones_like(as_time(t))
        return -0.5 * math.pi * jnp.sin(self._angle(t))

    def d_sigma(self, t):
        """d sigma / dt."""
        if self.path == "linear":
            return jnp.ones_like(as_time(t))
        return 0.5 * math.pi * jnp.cos(self._angle(t))

    def f(self, t):
        if self.path == "linear":
            return -1.0 / (1.0 - as_time(t))
        return -0.5 * math.pi * jnp.tan(self._angle(t))

    def g2(self, t):
        if self.path == "linear":
            t = as_time(t)
            return 2.0 * t / (1.0 - t)
        return math.pi * jnp.tan(self._angle(t))
