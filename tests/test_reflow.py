"""Reflow (Liu et al. 2023): ODE pairs, the straightness measure and the 2-rectified-flow loss against
closed forms, and the reflow experiment on a 2-D mixture (straightness and one-step error decrease)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives as O
from diffusion_jax import processes as P
from diffusion_jax.demos import reflow_demo
from diffusion_jax.reference import mixtures as M
from diffusion_jax.sampling.ode import pf_drift
from diffusion_jax.sampling.reflow import draw_pairs, one_step, straightness

LINEAR = P.Flow()
G = M.gaussian([0.5, -0.3], [[0.3, 0.1], [0.1, 0.2]])


def test_pairs_are_the_exact_flow_map():
    eps_fn = M.eps_fn(G, LINEAR)
    x, z = draw_pairs(eps_fn, LINEAR, jax.random.PRNGKey(0), (256, 2), sampler="dpmpp_3m", num_steps=64)
    assert float(jnp.std(z)) == pytest.approx(LINEAR.t_max, rel=0.1)
    exact = M.gaussian_flow(G, LINEAR, z, LINEAR.t_max, LINEAR.t_min)
    np.testing.assert_allclose(x, exact, atol=2e-3)
    with pytest.raises(ValueError, match="sampler: reflow pairs need a deterministic ODE sampler"):
        draw_pairs(eps_fn, LINEAR, jax.random.PRNGKey(0), (8, 2), sampler="euler_maruyama")


def test_straightness_against_quadrature_of_the_exact_trajectory():
    """S of a Gaussian's flow equals (1/T) int ||(z - x)/T - u(x_t, t)||^2 dt along the closed-form
    trajectory x_t = gaussian_flow(z, t_max -> t) (trapezoid on 4001 times); a near-point-mass data law
    (all paths straight at constant speed) has S ~ 0, and its one-step sample is the ODE's endpoint."""
    eps_fn = M.eps_fn(G, LINEAR)
    z = LINEAR.prior_sample(jax.random.PRNGKey(1), (64, 2))
    st = jax.jit(lambda z: straightness(eps_fn, LINEAR, z, num_steps=1000))(z)
    ts = jnp.linspace(LINEAR.t_max, LINEAR.t_min, 4001)
    span = LINEAR.t_max - LINEAR.t_min
    x_end = M.gaussian_flow(G, LINEAR, z, LINEAR.t_max, LINEAR.t_min)

    def integrand(t):
        xt = M.gaussian_flow(G, LINEAR, z, LINEAR.t_max, t)
        return jnp.sum(((z - x_end) / span - pf_drift(eps_fn, LINEAR, xt, t, None)) ** 2, -1)

    vals = jax.lax.map(integrand, ts)
    ref = jnp.sum(0.5 * (vals[1:] + vals[:-1]), 0) * (span / 4000) / span
    assert float(jnp.mean(ref)) > 0.1
    np.testing.assert_allclose(st.value, ref, rtol=0.03, atol=3e-3)
    np.testing.assert_allclose(st.x, x_end, atol=5e-3)
    point = M.gaussian([1.0, -1.0], 1e-6 * np.eye(2))
    st0 = straightness(M.eps_fn(point, LINEAR), LINEAR, z, num_steps=50)
    assert float(jnp.max(st0.value)) < 1e-4
    np.testing.assert_allclose(one_step(M.eps_fn(point, LINEAR), LINEAR, z), st0.x, atol=1e-3)


def test_reflow_loss_is_the_pair_velocity_regression():
    """At u_theta = x1 - x0 (the pair's straight velocity on the linear path) the loss is 0; a constant
    offset delta adds mean(delta^2); bad batches name what is missing."""
    k0, k1 = jax.random.split(jax.random.PRNGKey(2))
    x0, x1 = jax.random.normal(k0, (32, 3)), jax.random.normal(k1, (32, 3))
    target = x1 - x0

    def net(params, x, t, cond=None, train=False, rng=None):
        # recovers x1 - x0 from x_t = (1 - t) x0 + t x1 and the known x0
        t = t[:, None]
        return (x - x0) / t + params

    loss_fn = jax.jit(O.reflow_loss(LINEAR, net))
    loss, aux = loss_fn(jnp.zeros(3), {"x": x0, "noise": x1}, jax.random.PRNGKey(3))
    assert float(loss) < 1e-8
    delta = jnp.asarray([0.1, -0.2, 0.3])
    loss, _ = loss_fn(delta, {"x": x0, "noise": x1}, jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(loss), float(jnp.mean(delta ** 2)), rtol=1e-3)
    del target
    with pytest.raises(KeyError, match="'noise'"):
        O.reflow_loss(LINEAR, net)(jnp.zeros(3), {"x": x0}, jax.random.PRNGKey(3))
    with pytest.raises(ValueError, match=r"batch\['noise'\] must be shaped like"):
        O.reflow_loss(LINEAR, net)(jnp.zeros(3), {"x": x0, "noise": x1[:, :2]}, jax.random.PRNGKey(3))
    with pytest.raises(ValueError, match="time sampling"):
        O.reflow_loss(LINEAR, net, time_sampling="sd3")


def test_reflow_straightens_the_flow_and_one_step_sampling():
    """4-Gaussian ring: the exact first rectified flow has S ~ 1.5 and its one-step samples collapse
    toward the mean (sliced W2 to data ~ 1.4); an MLP trained 300 Adam steps on 2048 ODE pairs (the
    2-rectified flow) has S < 0.1 and one-step sliced W2 < 0.5 (measured at 400 steps: 0.029 and 0.21)."""
    r = reflow_demo.run(num_pairs=2048, num_eval=1000, train_steps=300, batch_size=256, hidden=64,
                        straight_steps=50, train_first=False)
    first, second = r["rows"]["1-RF exact velocity"], r["rows"]["2-RF MLP (reflow on exact pairs)"]
    print(r)
    assert first["straightness"] > 1.0 and first["one_step_sw2"] > 1.0, first
    assert second["straightness"] < 0.1 * first["straightness"], (first, second)
    assert second["one_step_sw2"] < 0.5 and second["one_step_sw2"] < 0.4 * first["one_step_sw2"], (first, second)
    assert second["ode_sw2"] < 0.3, second   # and the 2-RF still samples the data law with its ODE
