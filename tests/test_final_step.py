"""The samplers' last step as the papers take it (`sample.denoise_final`), driven by exact
Gaussian-mixture denoisers: the DDPM config is Ho et al.'s p_sample_loop step for step, and a
narrow data distribution comes out without the sigma(t_min) ~ 0.01 residual noise."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config as cv
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    return cv.load_config(os.path.join(ROOT, "configs", name))


def _sample_as_configured(config, eps_fn, process, key, shape, **override):
    s = config.sample
    kwargs = {k: s.kwargs[k] for k in s.kwargs.keys() if s.kwargs[k] is not None}
    opts = dict(num_steps=s.num_steps, spacing=s.spacing, t_end=s.t_end, denoise_final=s.denoise_final)
    opts.update(override)
    return sample(s.sampler, eps_fn, process, key, shape, **opts, **kwargs)


def _ho_p_sample_loop(eps_fn, betas, key, shape):
    """hojonathanho/diffusion `diffusion_utils_2.py` p_sample_loop with model_var_type='fixedlarge',
    clip_denoised=True, written from its formulas (coefficients in float64, as Ho's numpy tables), with
    the library's noise draws: x_T from split(key)[0], step i's z from fold_in(split(key)[1], i)."""
    T = len(betas)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    k_prior, k_noise = jax.random.split(key)
    x = jax.random.normal(k_prior, shape, jnp.float32)

    def body(i, x):
        n = T - 1 - i
        t = jnp.full((shape[0],), (n + 1) / T, jnp.float32)
        eps = eps_fn(x, t, None)
        x0 = jnp.clip(f(np.sqrt(1.0 / abar))[n] * x - f(np.sqrt(1.0 / abar - 1.0))[n] * eps, -1.0, 1.0)
        mean = f(coef1)[n] * x0 + f(coef2)[n] * x
        z = jax.random.normal(jax.random.fold_in(k_noise, i), shape, jnp.float32)
        return mean + jnp.where(n > 0, f(np.sqrt(betas))[n], 0.0) * z   # no noise when t == 0

    return jax.jit(lambda x: jax.lax.fori_loop(0, T, body, x))(x)


def test_ddpm_config_is_ho_et_al_p_sample_loop():
    config = _config("ddpm_cifar10.py")
    process = cv.build_process(config)
    gm = M.ring_mixture(num_components=4, radius=0.7, std=0.1)
    eps_fn = M.eps_fn(gm, process)
    key = jax.random.PRNGKey(3)
    out = _sample_as_configured(config, eps_fn, process, key, (256, 2))
    assert int(out.nfe) == 1000                      # Ho's T model calls
    ref = _ho_p_sample_loop(eps_fn, process.betas(), key, (256, 2))
    err = float(jnp.max(jnp.abs(out.x - ref)))
    assert err < 2e-4, err                           # measured 3e-5 (float32 over 1000 steps)


@pytest.mark.parametrize("name", ["ddpm_cifar10.py", "score_sde_vp_cifar10.py", "score_sde_ve_cifar10.py",
                                  "edm_cifar10.py"])
def test_paper_configs_end_without_residual_noise(name):
    """Data N(mu, (1e-3)^2 I): the papers' samplers return x0_hat at the end, whose spread is ~1e-4 here;
    stopping at t_min without it leaves noise of sigma(t_min) ~ 0.01 (0.002 for EDM, where the
    Tweedie step still shrinks it below 2e-3)."""
    config = _config(name)
    process = cv.build_process(config)
    gm = M.gaussian([0.3, -0.2], (1e-3) ** 2 * np.eye(2))
    eps_fn = M.eps_fn(gm, process)
    assert config.sample.denoise_final
    steps = {"ddpm_cifar10.py": 999, "edm_cifar10.py": 17}.get(name, 100)   # fewer steps: a fast check
    out = _sample_as_configured(config, eps_fn, process, jax.random.PRNGKey(0), (512, 2), num_steps=steps)
    spread = float(jnp.max(jnp.std(out.x, axis=0)))
    bias = float(jnp.max(jnp.abs(jnp.mean(out.x, axis=0) - gm.means[0])))
    assert spread < 1e-3 and bias < 1e-3, (spread, bias)
    if name != "edm_cifar10.py":
        raw = _sample_as_configured(config, eps_fn, process, jax.random.PRNGKey(0), (512, 2), num_steps=steps,
                                    denoise_final=False)
        assert float(jnp.min(jnp.std(raw.x, axis=0))) > 5e-3


def test_denoise_final_keeps_the_last_ancestral_noise_and_clips():
    """With denoise_final the ancestral step before the x0 step still adds its noise (noise_final
    defaults to True), unless noise_final=False is passed; clip_x0 also clips the final x0_hat."""
    config = _config("ddpm_cifar10.py")
    process = cv.build_process(config)
    gm = M.ring_mixture(num_components=4, radius=2.0, std=0.1)   # outside [-1, 1]: clipping shows
    eps_fn = M.eps_fn(gm, process)
    key = jax.random.PRNGKey(1)
    a = sample("ancestral", eps_fn, process, key, (64, 2), num_steps=20, denoise_final=True, clip_x0=True)
    b = sample("ancestral", eps_fn, process, key, (64, 2), num_steps=20, denoise_final=True, clip_x0=True,
               noise_final=False)
    assert float(jnp.max(jnp.abs(a.x))) <= 1.0 and float(jnp.max(jnp.abs(a.x))) == 1.0
    assert not np.allclose(a.x, b.x)
