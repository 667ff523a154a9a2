"""The top-level `sample` entry point: dispatch, determinism, NFE accounting and clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes as P
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling import SAMPLERS, sample, steps_for_nfe

GM = M.ring_mixture()
VP = P.VPLinear()
EPS = M.eps_fn(GM, VP)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_is_reproducible_and_counts_nfe(name):
    key = jax.random.PRNGKey(0)
    a = sample(name, EPS, VP, key, (64, 2), num_steps=6)
    b = sample(name, EPS, VP, key, (64, 2), num_steps=6)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a.x)))
    if name != "adaptive":
        spec = SAMPLERS[name]
        expected = {"heun": 12, "midpoint": 12, "pc": 12}.get(name, 6)
        assert int(a.nfe) == expected, (name, a.nfe)
        assert spec.nfe_per_step * 6 == expected
    else:
        assert int(a.nfe) > 0
    if SAMPLERS[name].stochastic:
        c = sample(name, EPS, VP, jax.random.PRNGKey(1), (64, 2), num_steps=6)
        assert not np.allclose(a.x, c.x)


def test_denoise_final_adds_one_evaluation_and_lands_on_x0():
    out = sample("dpmpp_2m", EPS, VP, jax.random.PRNGKey(0), (256, 2), num_steps=20, denoise_final=True)
    assert int(out.nfe) == 21
    # The final denoised samples sit on the ring of radius 2.
    r = jnp.linalg.norm(out.x, axis=-1)
    assert abs(float(jnp.median(r)) - 2.0) < 0.05


def test_steps_for_nfe():
    assert steps_for_nfe("ddim", 10) == 10 and steps_for_nfe("heun", 35) == 17 and steps_for_nfe("pc", 10) == 5


def test_unknown_sampler_and_spacing():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+'.*known samplers"):
        sample("dpm++", EPS, VP, jax.random.PRNGKey(0), (4, 2))
    with pytest.raises(ValueError, match="unknown time-step spacing"):
        sample("ddim", EPS, VP, jax.random.PRNGKey(0), (4, 2), spacing="exp")


def test_denoiser_output_shape_mismatch_is_named():
    bad = lambda x, t, c: x[:, :1]
    with pytest.raises(ValueError, match=r"must return eps shaped like x \(4, 2\), got \(4, 1\)"):
        sample("ddim", bad, VP, jax.random.PRNGKey(0), (4, 2))
    with pytest.raises(ValueError, match="the denoiser failed on x of shape"):
        sample("ddim", EPS, VP, jax.random.PRNGKey(0), (4, 3))
    with pytest.raises(ValueError, match=r"x_init has shape \(4, 2\)"):
        sample("ddim", EPS, VP, jax.random.PRNGKey(0), (8, 2), x_init=jnp.zeros((4, 2)))


def test_time_outside_range_is_named():
    with pytest.raises(ValueError, match="outside the time range of VPLinear"):
        sample("ddim", EPS, VP, jax.random.PRNGKey(0), (4, 2), t_end=0.0)


def test_nan_from_the_denoiser_names_the_step():
    def nan_below_half(x, t, c):
        e = EPS(x, t, c)
        return jnp.where(t[:, None] < 0.5, jnp.nan, e)

    with pytest.raises(FloatingPointError, match=r"sampler 'ddim'.*non-finite.*at step (\d+) \(t = 0\.4"):
        sample("ddim", nan_below_half, VP, jax.random.PRNGKey(0), (4, 2), num_steps=10, spacing="uniform")
