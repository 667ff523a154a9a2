"""Alternating updates of parameter groups (training/phases.py): one step of a PhasedLoss equals the
hand-written sequence of optax updates (the second phase sees the first phase's update), unnamed
groups stay frozen, per-group optimiser settings apply, evaluation calls work, bad wiring is named;
train.max_seconds stops a command-line run with a checkpoint."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import training as T

sys.path.insert(0, os.path.dirname(__file__))


def _params():
    return {"d": {"w": jnp.array([0.5, -1.0, 2.0])}, "g": {"w": jnp.array([1.0, 0.3, -0.7])},
            "frozen": {"w": jnp.array([3.0])}}


def d_loss(p, batch, rng):
    # depends on both groups: the generator's value at this point matters
    return jnp.sum((p["d"]["w"] * p["g"]["w"] - batch["x"]) ** 2) + p["frozen"]["w"][0], {"aux": jnp.float32(1.0)}


def g_loss(p, batch, rng):
    return jnp.sum(jnp.sin(p["d"]["w"]) * p["g"]["w"] ** 2), {"aux": jnp.float32(2.0)}


def _cfgs():
    return {"d": T.OptimizerConfig(learning_rate=0.1, b1=0.5, b2=0.9, grad_clip_norm=None),
            "g": T.OptimizerConfig(learning_rate=0.03, b1=0.0, b2=0.99, grad_clip_norm=None)}


def test_phased_step_equals_sequential_optax_updates():
    loss = T.PhasedLoss((T.Phase("disc", ("d",), d_loss), T.Phase("gen", "g", g_loss)), report="gen")
    tx, schedule = T.make_group_optimizer(_cfgs())
    init = T.make_init_fn(lambda k: _params(), tx, ema_decays=(0.5,))
    state = init(jax.random.PRNGKey(0))
    assert set(state.opt_state) == {"d", "g"}                # frozen: no optimiser state
    batch = {"x": jnp.array([0.1, 0.2, 0.3])}
    step = jax.jit(T.make_train_step(loss, tx, schedule))
    s1, m = step(state, batch, jax.random.PRNGKey(1))
    s2, _ = step(s1, batch, jax.random.PRNGKey(2))

    # by hand: Adam(0.1, 0.5, 0.9) on d from d_loss at (d0, g0); then Adam(0.03, 0, 0.99) on g from
    # g_loss at (d1, g0), d1 being the UPDATED discriminator
    p = _params()
    tx_d = optax.adamw(0.1, b1=0.5, b2=0.9, weight_decay=0.0)
    tx_g = optax.adamw(0.03, b1=0.0, b2=0.99, weight_decay=0.0)
    od, og = tx_d.init(p["d"]), tx_g.init(p["g"])
    for _ in range(2):
        gd = jax.grad(lambda d: d_loss({**p, "d": d}, batch, None)[0])(p["d"])
        u, od = tx_d.update(gd, od, p["d"])
        p = {**p, "d": optax.apply_updates(p["d"], u)}
        gg = jax.grad(lambda g: g_loss({**p, "g": g}, batch, None)[0])(p["g"])
        u, og = tx_g.update(gg, og, p["g"])
        p = {**p, "g": optax.apply_updates(p["g"], u)}
        if _ == 0:
            p1 = p
    for k in ("d", "g"):
        np.testing.assert_allclose(s1.params[k]["w"], p1[k]["w"], rtol=1e-6)
        np.testing.assert_allclose(s2.params[k]["w"], p[k]["w"], rtol=1e-6)
    np.testing.assert_array_equal(s2.params["frozen"]["w"], [3.0])
    # using the OLD discriminator in the generator phase would give a different g
    gg_old = jax.grad(lambda g: g_loss({**_params(), "g": g}, batch, None)[0])(_params()["g"])
    gg_new = jax.grad(lambda g: g_loss({**p1, "g": g}, batch, None)[0])(_params()["g"])
    assert float(jnp.max(jnp.abs(gg_old["w"] - gg_new["w"]))) > 1e-2
    # metrics: per phase, the report phase as 'loss', per-group gradient norms; EMA of all params
    np.testing.assert_allclose(m["loss"], g_loss(_params() | {"d": p1["d"]}, batch, None)[0], rtol=1e-6)
    np.testing.assert_allclose(m["disc/loss"], d_loss(_params(), batch, None)[0], rtol=1e-6)
    assert float(m["disc/aux"]) == 1.0 and float(m["gen/aux"]) == 2.0
    assert {"grad_norm/d", "grad_norm/g", "grad_norm", "learning_rate"} <= set(m)
    np.testing.assert_allclose(s1.ema["0p5"]["g"]["w"], 0.5 * (_params()["g"]["w"] + p1["g"]["w"]),
                               rtol=1e-6)                        # decay 0.5, no warm-up
    assert int(s2.step) == 2

    # evaluation: the loss object itself, at one parameter set, no updates
    l, aux = jax.jit(loss)(_params(), batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(l, g_loss(_params(), batch, None)[0], rtol=1e-6)
    np.testing.assert_allclose(aux["disc/loss"], d_loss(_params(), batch, None)[0], rtol=1e-6)


def test_stateful_phases_thread_the_model_state():
    def a(p, batch, rng, ms):
        return jnp.sum(p["d"]["w"] ** 2), {"model_state": {"n": ms["n"] + 1}}

    def b(p, batch, rng, ms):
        return jnp.sum(p["g"]["w"] ** 2) * ms["n"], {"model_state": {"n": ms["n"] * 10}}

    loss = T.PhasedLoss((T.Phase("a", ("d",), a), T.Phase("b", ("g",), b)))
    tx, _ = T.make_group_optimizer(_cfgs())
    init = T.make_init_fn(lambda k: _params(), tx,
                          init_model_state_fn=lambda k: {"n": jnp.ones((), jnp.float32)})
    state = init(jax.random.PRNGKey(0))
    s1, m = jax.jit(T.make_train_step(loss, tx))(state, {"x": jnp.zeros(3)}, jax.random.PRNGKey(0))
    assert float(s1.model_state["n"]) == 20.0                  # (1 + 1) * 10: b saw a's state
    np.testing.assert_allclose(m["loss"], 2.0 * float(jnp.sum(_params()["g"]["w"] ** 2)), rtol=1e-6)


def test_bad_wiring_is_named():
    loss = T.PhasedLoss((T.Phase("disc", ("d",), d_loss), T.Phase("gen", ("g",), g_loss)))
    tx, _ = T.make_optimizer(T.OptimizerConfig())
    with pytest.raises(ValueError, match="per-group optimiser"):
        T.make_train_step(loss, tx)
    tx, _ = T.make_group_optimizer({"d": T.OptimizerConfig()})
    with pytest.raises(ValueError, match=r"\['g'\].*no optimiser"):
        T.make_train_step(loss, tx)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        T.make_group_optimizer({"d": T.OptimizerConfig(grad_accum_steps=2)})
    with pytest.raises(ValueError, match="distinct"):
        T.PhasedLoss((T.Phase("x", ("d",), d_loss), T.Phase("x", ("g",), g_loss)))
    bad = T.PhasedLoss((T.Phase("disc", ("dd",), d_loss),))
    with pytest.raises(ValueError, match=r"\['dd'\]"):
        bad(_params(), {"x": jnp.zeros(3)}, jax.random.PRNGKey(0))


def test_group_optimizer_without_phases_freezes_unnamed_groups():
    tx, _ = T.make_group_optimizer(_cfgs())
    p = _params()
    loss = lambda p, b, r: (d_loss(p, b, r)[0] + g_loss(p, b, r)[0], {})
    state = T.make_init_fn(lambda k: p, tx)(jax.random.PRNGKey(0))
    s1, m = jax.jit(T.make_train_step(loss, tx))(state, {"x": jnp.zeros(3)}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(s1.params["frozen"]["w"], p["frozen"]["w"])
    assert float(jnp.max(jnp.abs(s1.params["d"]["w"] - p["d"]["w"]))) > 0.05   # Adam step ~ lr 0.1


def test_max_seconds_stops_a_run_with_a_checkpoint(tmp_path, compile_cache):
    from diffusion_jax import cli
    from test_cli import tiny
    workdir = str(tmp_path / "run")
    out = cli.main(tiny(workdir, str(tmp_path / "data"), "--config.train.max_seconds=1e-6",
                        "--config.train.sample_every=0"))
    assert out["stopped_at_time_limit"] and out["step"] == 1 and out["saved_steps"] == [1]
    assert out["train_seconds"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
