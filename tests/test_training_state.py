"""Train state, optimiser factory, EMA, gradient accumulation and the pure train step (1 device)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _train_common as common  # noqa: E402
from diffusion_jax import training as T  # noqa: E402

B = 4


def _batch(seed=0):
    rs = np.random.RandomState(seed)
    return {"x": rs.uniform(-1, 1, (B, common.H, common.W, common.C)).astype(np.float32)}


def _setup(opt=None, ema=(0.9,), loss_fn=None, **step_kw):
    _, init_params_fn, default_loss = common.make_model(ch=8)
    opt = opt or T.OptimizerConfig(learning_rate=1e-2, grad_clip_norm=None)
    tx, schedule = T.make_optimizer(opt)
    init_fn = T.make_init_fn(init_params_fn, tx, ema)
    state = jax.jit(lambda r: nn.unbox(init_fn(r)))(jax.random.PRNGKey(0))
    step = jax.jit(T.make_train_step(loss_fn or default_loss, tx, schedule,
                                     grad_accum_steps=opt.grad_accum_steps, **step_kw))
    return state, step, schedule


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_schedules():
    s = T.make_schedule(T.OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine",
                                          total_steps=110, end_lr_factor=0.1))
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0, 0.5, 1, 0.55, 0.1],
                               atol=1e-6)
    c = T.make_schedule(T.OptimizerConfig(learning_rate=2.0, warmup_steps=4))
    np.testing.assert_allclose([c(0), c(2), c(4), c(1000)], [0, 1, 2, 2], atol=1e-6)
    assert float(T.make_schedule(T.OptimizerConfig(learning_rate=3.0))(0)) == 3.0
    with pytest.raises(ValueError, match="needs total_steps"):
        T.make_optimizer({"schedule": "cosine"})
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        T.make_optimizer({"schedule": "linear"})
    with pytest.raises(ValueError, match=r"unknown optimizer options \['lr'\]"):
        T.make_optimizer({"lr": 1.0})


def test_ema_keys_and_warmup():
    assert T.ema_key(0.9999) == "0p9999" and T.ema_decays_of({"0p9999": 1}) == {"0p9999": 0.9999}
    np.testing.assert_allclose(T.ema_decay_at(0.9999, 0, True), 0.1)
    np.testing.assert_allclose(T.ema_decay_at(0.9999, 90, True), 91 / 100)
    np.testing.assert_allclose(T.ema_decay_at(0.5, 90, True), 0.5)
    np.testing.assert_allclose(T.ema_decay_at(0.9999, 0, False), 0.9999)
    with pytest.raises(ValueError, match="duplicate EMA decays"):
        T.make_init_fn(lambda k: {}, T.make_optimizer()[0], (0.9, 0.9))


def test_update_ema_without_warmup():
    ema = {"0p9": {"w": jnp.ones(3)}}
    out = T.update_ema(ema, {"w": jnp.zeros(3)}, {"0p9": 0.9}, step=5, warmup=False)
    np.testing.assert_allclose(out["0p9"]["w"], 0.9 * np.ones(3), rtol=1e-6)


def test_step_updates_params_and_ema():
    state, step, _ = _setup(ema=(0.9, 0.999), ema_warmup=True)
    new, metrics = step(state, _batch(), jax.random.PRNGKey(1))
    assert int(new.step) == 1
    for key in ("0p9", "0p999"):
        d = 0.1                                           # warm-up: min(decay, 1/10) at update 0
        for e0, p1, e1 in zip(_leaves(state.ema[key]), _leaves(new.params), _leaves(new.ema[key])):
            np.testing.assert_allclose(e1, d * e0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(_leaves(state.params),
                                                          _leaves(new.params)))
    assert {"loss", "grad_norm", "learning_rate", "mse", "eps_mse", "weight"} <= set(metrics)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
    np.testing.assert_allclose(metrics["learning_rate"], 1e-2)
    # the second update's warm-up decay is min(decay, 2/11)
    newer, _ = step(new, _batch(1), jax.random.PRNGKey(2))
    for e0, p1, e1 in zip(_leaves(new.ema["0p9"]), _leaves(newer.params),
                          _leaves(newer.ema["0p9"])):
        np.testing.assert_allclose(e1, 2 / 11 * e0 + 9 / 11 * p1, rtol=1e-5, atol=1e-7)


def test_generic_loss_fn_and_aux_flattening():
    def loss_fn(params, batch, rng):
        sq = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return sq.astype(jnp.bfloat16), {"nested": {"a": sq}, "vec": jnp.ones(3), "n": 2.0}

    state, step, _ = _setup(loss_fn=loss_fn)
    _, metrics = step(state, _batch(), jax.random.PRNGKey(0))
    assert set(metrics) == {"loss", "grad_norm", "learning_rate", "nested/a"}
    assert metrics["loss"].dtype == jnp.float32


def test_weight_decay_only_on_matrices():
    def zero_loss(params, batch, rng):
        return 0.0 * sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(params)), {}

    opt = T.OptimizerConfig(learning_rate=0.1, weight_decay=0.5, grad_clip_norm=None)
    state, step, _ = _setup(opt=opt, loss_fn=zero_loss)
    new, _ = step(state, _batch(), jax.random.PRNGKey(0))
    k0, k1 = state.params["mlp_in"]["kernel"], new.params["mlp_in"]["kernel"]
    np.testing.assert_allclose(k1, k0 * (1 - 0.1 * 0.5), rtol=1e-6)
    state = state.replace(params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params))
    new, _ = step(state, _batch(), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(new.params["mlp_in"]["bias"], state.params["mlp_in"]["bias"])


def test_gradient_clipping_reports_unclipped_norm():
    def big_loss(params, batch, rng):
        return 1e3 * sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(params)), {}

    opt = T.OptimizerConfig(learning_rate=1.0, grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=0.0)
    state, step, _ = _setup(opt=opt, loss_fn=big_loss)
    _, metrics = step(state, _batch(), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    np.testing.assert_allclose(metrics["grad_norm"], 1e3 * np.sqrt(n), rtol=1e-5)


def test_gradient_accumulation_multisteps():
    opt = T.OptimizerConfig(learning_rate=1e-2, grad_clip_norm=None, grad_accum_steps=2,
                            schedule="cosine", total_steps=10)
    state, step, schedule = _setup(opt=opt)
    s1, m1 = step(state, _batch(0), jax.random.PRNGKey(1))
    for a, b in zip(_leaves(state.params) + _leaves(state.ema),
                    _leaves(s1.params) + _leaves(s1.ema)):
        np.testing.assert_array_equal(a, b)              # micro-step: nothing applied yet
    s2, m2 = step(s1, _batch(1), jax.random.PRNGKey(2))
    assert int(s2.step) == 2
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(s1.params), _leaves(s2.params)))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(s1.ema), _leaves(s2.ema)))
    assert float(m1["learning_rate"]) == float(m2["learning_rate"]) == float(schedule(0))
    s3, _ = step(s2, _batch(2), jax.random.PRNGKey(3))
    _, m4 = step(s3, _batch(3), jax.random.PRNGKey(4))
    np.testing.assert_allclose(m4["learning_rate"], schedule(1))


def test_compiled_step_donates_state_and_reports_compile_time():
    mesh = T.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, init_params_fn, loss_fn = common.make_model(ch=8)
    tx, schedule = T.make_optimizer(T.OptimizerConfig())
    init = T.init_train_state(T.make_init_fn(init_params_fn, tx, (0.99,)), mesh,
                              jax.random.PRNGKey(0))
    assert init.compile_seconds > 0
    compiled = T.compile_train_step(T.make_train_step(loss_fn, tx, schedule), init.abstract,
                                    T.batch_spec_of(_batch()), mesh)
    assert compiled.compile_seconds > 0 and compiled.lower_seconds > 0
    old = init.state
    new, metrics = compiled(old, _batch())
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert old.params["mlp_in"]["kernel"].is_deleted()   # donated


def test_train_config_roundtrip():
    cfg = T.TrainConfig.from_any({"num_steps": 5, "optimizer": {"learning_rate": 0.5},
                                  "ema_decays": (0.9,)})
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["optimizer"]["learning_rate"] == 0.5
    assert T.TrainConfig.from_any(d).optimizer_config() == cfg.optimizer_config()
    with pytest.raises(ValueError, match=r"unknown TrainConfig options \['bogus'\]"):
        T.TrainConfig.from_any({"bogus": 1})


def test_maybe_initialize_single_process_is_a_noop():
    assert T.maybe_initialize() is False
    with pytest.raises(ValueError, match="needs a coordinator_address"):
        T.maybe_initialize(num_processes=2, process_id=0)


def test_grad_norm_groups_report_each_top_level_group():
    import optax
    params0 = {"encoder": {"w": jnp.full((3,), 2.0)}, "decoder": {"w": jnp.full((4,), -1.0)}}

    def loss_fn(p, batch, rng):
        return jnp.sum(p["encoder"]["w"] ** 2) + 3.0 * jnp.sum(p["decoder"]["w"]), {}

    tx = optax.sgd(0.1)
    state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params0, opt_state=tx.init(params0), ema={},
                         rng=jax.random.PRNGKey(0), model_state={})
    step = T.make_train_step(loss_fn, tx, grad_norm_groups=("encoder", "decoder"))
    _, metrics = jax.jit(step)(state, _batch(), jax.random.PRNGKey(1))
    np.testing.assert_allclose(metrics["grad_norm/encoder"], np.sqrt(3 * 4.0 ** 2), rtol=1e-6)   # 2 w
    np.testing.assert_allclose(metrics["grad_norm/decoder"], np.sqrt(4 * 3.0 ** 2), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(48.0 + 36.0), rtol=1e-6)
    with pytest.raises(ValueError, match="not top-level parameter groups"):
        jax.eval_shape(T.make_train_step(loss_fn, tx, grad_norm_groups=("nope",)), state, _batch(),
                       jax.random.PRNGKey(1))
