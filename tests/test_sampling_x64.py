"""Every sampler under x64 (`jax.enable_x64(True)`, a context manager, so nothing leaks into other
tests): the state is float64 when the schedule is, float32 input stays float32, and float64 buys the
accuracy that float32 roundoff takes away."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes as P
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import SAMPLERS, sample, time_grid

VP = P.VPLinear()
# A diagonal covariance: its eigenvectors are exact, so the closed-form flow map is exact in float64.
GM = M.gaussian([0.5, -0.3], [[0.3, 0.0], [0.0, 0.2]])
EPS = M.eps_fn(GM, VP)
X_T = np.random.default_rng(0).standard_normal((64, 2))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_in_float64_under_x64(name):
    with jax.enable_x64(True):
        out = sample(name, EPS, VP, jax.random.PRNGKey(0), (64, 2), num_steps=6)
        assert out.x.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(out.x)))
        if name != "adaptive":
            assert int(out.nfe) == 6 * SAMPLERS[name].nfe_per_step
        # x_init (float32 here) is taken into the schedule dtype, and denoise_final keeps it.
        out = sample(name, EPS, VP, jax.random.PRNGKey(0), (64, 2), num_steps=6,
                     x_init=X_T.astype(np.float32), denoise_final=True)
        assert out.x.dtype == jnp.float64
        # Called directly, a sampler keeps the state in its input's dtype (float64 schedule, float32 x).
        ts = time_grid(VP, 6, SAMPLERS[name].default_spacing)
        assert ts.dtype == jnp.float64
        out = SAMPLERS[name].fn(EPS, VP, jnp.asarray(X_T, jnp.float32), ts, key=jax.random.PRNGKey(1))
        assert out.x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out.x)))
    out = sample(name, EPS, VP, jax.random.PRNGKey(0), (64, 2), num_steps=6)
    assert out.x.dtype == jnp.float32


def _flow_error(name, num_steps, x64):
    """Max |x - exact flow map| at t_min from the same x_T (rounded to float32 for the float32 run)."""
    x_init = X_T if x64 else X_T.astype(np.float32).astype(np.float64)
    with jax.enable_x64(x64):
        out = sample(name, EPS, VP, jax.random.PRNGKey(0), (64, 2), num_steps=num_steps, x_init=x_init)
    with jax.enable_x64(True):
        ref = np.asarray(M.gaussian_flow(GM, VP, jnp.asarray(x_init), VP.t_max, VP.t_min))
    return out.x.dtype, float(np.max(np.abs(np.asarray(out.x, np.float64) - ref)))


def test_float64_reaches_the_exact_flow_map_below_float32_roundoff():
    # DPM-Solver++(3M), 800 log-SNR steps: truncation error ~1e-9, far below float32's roundoff floor.
    # Measured: float64 1.1e-9, float32 5.2e-6.
    dt64, err64 = _flow_error("dpmpp_3m", 800, True)
    dt32, err32 = _flow_error("dpmpp_3m", 800, False)
    assert dt64 == jnp.float64 and dt32 == jnp.float32
    assert err64 < 1e-8, err64
    assert err32 > 1e-6, err32
    assert err64 < err32 / 100
