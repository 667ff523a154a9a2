"""DDGAN's time-conditional discriminator D(x_t, t, x_{t+1}) (networks/ddgan_discriminator.py) with the
schedule, the GAN losses and R1 of objectives/ddgan.py: shapes, t-dependence, R1 = gamma/2 E||grad||^2
of this network, gradients through the posterior sample into the generator's x0, the minibatch
stddev channel by hand. One compiled function (fast on a busy CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.networks.ddgan_discriminator import TimeConditionalDiscriminator, minibatch_stddev
from diffusion_jax.objectives import ddgan as G

FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def test_time_conditional_discriminator_with_losses_and_r1():
    sch = G.DDGANSchedule(num_steps=4)
    x0 = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0, 1, 2, 3])
    x_t, x_tp1 = sch.q_sample_pairs(x0, t, jax.random.PRNGKey(0))
    d = TimeConditionalDiscriminator(ch=8, ch_mult=(1, 2), t_dim=16, stddev_group=2)
    params = jax.jit(d.init, **FAST)(jax.random.PRNGKey(1), x_t, t, x_tp1)["params"]

    @jax.jit
    def everything(p, a, b, x0_):
        def d_fn(x, tt):
            return d.apply({"params": p}, x, tt, b)
        logit, logit_t1 = d_fn(a, t), d_fn(a, t + 1)
        r1 = G.r1_penalty(lambda x: d_fn(x, t), a, gamma=0.05)
        g = jax.grad(lambda x: jnp.sum(d_fn(x, t)))(a)
        gl = jax.grad(lambda x: G.generator_loss(d_fn(sch.sample_posterior(x, b, t, jax.random.PRNGKey(2)), t)))(x0_)
        return logit, logit_t1, r1, g, gl

    logit, logit_t1, r1, g, gl = everything(params, x_t, x_tp1, x0)
    assert logit.shape == (4,) and np.all(np.isfinite(np.asarray(logit)))
    assert float(jnp.max(jnp.abs(logit_t1 - logit))) > 0                       # t matters
    np.testing.assert_allclose(float(r1), 0.025 * float(jnp.mean(jnp.sum(g ** 2, axis=(1, 2, 3)))), rtol=1e-5)
    assert float(r1) > 0
    assert float(jnp.max(jnp.abs(gl[1:]))) > 0        # the generator's x0 gets gradients (t > 0)
    # minibatch stddev: the std over each group of examples, by hand
    h = jnp.asarray(np.random.default_rng(8).normal(size=(4, 2, 2, 3)), jnp.float32)
    out = np.asarray(minibatch_stddev(h, 2))
    y = np.asarray(h).reshape(2, 2, 2, 2, 3)
    ref = np.sqrt(y.var(axis=0) + 1e-8).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out[:, 0, 0, 3], np.tile(ref, 2), rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        d.init(jax.random.PRNGKey(1), jnp.zeros((2, 6, 6, 1)), jnp.zeros(2), jnp.zeros((2, 6, 6, 1)))
