"""Bits/dim at a chosen likelihood time eps (score_sde: 1e-5): `image_bpd(t_min=...)` honours it against
the closed form, records it, and the config field `eval.bpd_t_min` is validated and set in the paper
configs."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config as cv
from diffusion_jax import processes as P
from diffusion_jax.likelihood import dequantize, image_bpd
from diffusion_jax.reference import mixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_image_bpd_is_evaluated_at_t_min_as_the_closed_form_says():
    """Data N(mu, s^2 I) with mu the cell centres of 2x2x3 images and s = 0.003 (below a cell's width,
    as for a sharp model): log p_t(y) = log N(y; alpha mu, (alpha^2 s^2 + sigma^2) I), so the bound
    moves by ~1.5 bits/dim between t = 1e-5 (sigma = 0.0010) and t = 1e-3 (sigma = 0.0105): measured
    0.388 and 1.838, each within 2e-4 of the closed form."""
    d, s = 12, 0.003
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 2, 2, 3)).astype(np.uint8)
    mu = (images[0].reshape(d).astype(np.float64) + 0.5) / 128.0 - 1.0
    gm = mixtures.gaussian(mu, s ** 2 * np.eye(d))
    proc = P.VPLinear(t_min=1e-5)
    eps_fn = mixtures.eps_fn(gm, proc)
    prior = lambda z: mixtures.log_prob(gm, z.reshape(z.shape[0], -1), proc, proc.t_max)  # noqa: E731
    key = jax.random.PRNGKey(7)
    kq, _ = jax.random.split(jax.random.fold_in(key, 0))
    y = dequantize(kq, images[:1]).reshape(1, d)

    def closed_form(t):
        logp = float(mixtures.log_prob(gm, y, proc, t)[0])
        return -(logp + d * math.log(2 / 256)) / (d * math.log(2))

    bpd = {}
    for t_min in (None, 1e-5, 1e-3):
        out = jax.jit(lambda k, t_min=t_min: image_bpd(eps_fn, proc, images[:1], k, divergence="exact",
                                                       prior_logp=prior, t_min=t_min))(key)
        t = 1e-5 if t_min is None else t_min
        assert float(out.t_min) == pytest.approx(t)
        bpd[t_min] = float(out.bpd[0])
        assert bpd[t_min] == pytest.approx(closed_form(t), abs=2e-3), t_min
    assert bpd[None] == pytest.approx(bpd[1e-5], abs=1e-6)      # default: the process' t_min
    assert bpd[1e-3] - bpd[1e-5] > 1.0                           # measured 1.45 bits/dim
    with pytest.raises(ValueError, match="likelihood time range"):
        image_bpd(eps_fn, P.VPLinear(), images[:1], key, t_min=1e-5)   # below this process' t_min


def _load(name, overrides=()):
    return cv.load_config(os.path.join(ROOT, "configs", name), overrides)


def test_bpd_t_min_config_field():
    for name in ("score_sde_vp_cifar10.py", "score_sde_subvp_cifar10.py", "score_sde_ve_cifar10.py"):
        c = _load(name)
        assert c.eval.bpd_t_min == 1e-5 and c.process.kwargs.t_min == 1e-5, name
    assert _load("ddpm_cifar10.py").eval.bpd_t_min == 1e-3     # 1/T: the discrete model's smallest t
    assert _load("edm_cifar10.py").eval.bpd_t_min == 0.002      # sigma_min
    assert _load("default.py").eval.bpd_t_min is None            # the process' t_min
    with pytest.raises(cv.ConfigError, match=r"config\.eval\.bpd_t_min=1e-05 is outside the time range"):
        _load("default.py", ["eval.bpd_t_min=1e-5"])             # cosine process: t_min = 1e-3
    with pytest.raises(cv.ConfigError, match=r"config\.eval\.bpd_t_min: must be > 0"):
        _load("default.py", ["eval.bpd_t_min=-1.0"])
