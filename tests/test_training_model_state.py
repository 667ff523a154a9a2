"""Stateful losses: `TrainState.model_state` (BatchNorm running statistics, counters, a boxed loss
history) through the pure and the compiled train step, gradient accumulation, checkpoints, resume
through `train()`, an 8-device mesh, and clear errors."""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from diffusion_jax import training as T  # noqa: E402

if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices, jax was imported with {jax.device_count()}: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)",
                allow_module_level=True)

D, F, B = 8, 16, 16            # input/output dim, hidden features, global batch
MOMENTUM = 0.9                 # BatchNorm running-average momentum
HIST = 0.8                     # decay of the boxed per-output loss history
N_STEPS = 3
OPT = T.OptimizerConfig(learning_rate=1e-2, grad_clip_norm=None)


def _box(init, axes):
    return nn.with_logical_partitioning(init, axes)


class BNNet(nn.Module):
    """dense(D->F, no bias) -> BatchNorm -> relu -> dense(F->D); kernels carry logical names."""

    @nn.compact
    def __call__(self, x, train: bool):
        # no bias before BatchNorm: its gradient is exactly 0 (BN removes the mean), so Adam
        # would turn rounding noise into +-lr updates
        h = nn.Dense(F, use_bias=False, name="dense_in",
                     kernel_init=_box(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, name="bn")(h)
        return nn.Dense(D, kernel_init=_box(nn.initializers.lecun_normal(), ("mlp", "embed")),
                        name="dense_out")(nn.relu(h))


MODULE = BNNet()
X0 = jnp.zeros((1, D))


def init_params_fn(key):
    return MODULE.init(key, X0, train=False)["params"]


def init_model_state_fn(key):
    """The composition convention: {'encoder': batch_stats, 'objective': the loss's own state}."""
    return {"encoder": MODULE.init(key, X0, train=False)["batch_stats"],
            "objective": {"n": jnp.zeros((), jnp.int32),
                          "hist": _box(nn.initializers.zeros_init(), ("embed",))(key, (D,))}}


def bn_loss(params, batch, rng, model_state):
    del rng
    out, new_vars = MODULE.apply({"params": params, "batch_stats": model_state["encoder"]},
                                 batch["x"], train=True, mutable=["batch_stats"])
    err = (out - batch["y"]) ** 2
    obj = model_state["objective"]
    new_obj = {"n": obj["n"] + 1,
               "hist": HIST * obj["hist"] + (1 - HIST) * jnp.mean(err, axis=0)}
    loss = jnp.mean(err)
    return loss, {"mse": loss, "model_state": {"encoder": new_vars["batch_stats"],
                                               "objective": new_obj}}


def _batch(i, n=B):
    rs = np.random.RandomState(100 + i)
    x = rs.normal(1.0, 2.0, (n, D)).astype(np.float32)
    return {"x": x, "y": np.tanh(x[:, ::-1]).astype(np.float32)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(T.to_host(tree))]


def assert_tree_close(a, b, rtol=1e-6, atol=1e-7, what=""):
    la, ta = jax.tree_util.tree_flatten_with_path(T.to_host(a))
    lb, tb = jax.tree_util.tree_flatten_with_path(T.to_host(b))
    assert ta == tb, f"{what}: {ta} vs {tb}"
    for (path, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, f"{what}{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def assert_tree_equal(a, b, what=""):
    la, ta = jax.tree_util.tree_flatten_with_path(T.to_host(a))
    lb, tb = jax.tree_util.tree_flatten_with_path(T.to_host(b))
    assert ta == tb, what
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{what}{jax.tree_util.keystr(path)}"


# ------------------------------------------------------------------------------ the runs
def run_compiled(mesh, n_steps=N_STEPS):
    tx, schedule = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx, (0.9,), init_model_state_fn=init_model_state_fn)
    init = T.init_train_state(init_fn, mesh, jax.random.PRNGKey(0))
    step = T.compile_train_step(T.make_train_step(bn_loss, tx, schedule), init.abstract,
                                T.batch_spec_of(_batch(0)), mesh)
    out = {"init": T.to_host(init.state), "init_obj": init, "metrics": []}
    state = init.state
    for i in range(n_steps):
        state, metrics = step(state, _batch(i))
        out["metrics"].append(T.to_host(metrics))
    out["state"] = state
    return out


_RUNS = {}


def get_run(name):
    if name not in _RUNS:
        mesh = (T.make_mesh((1, 1, 1), devices=jax.devices()[:1]) if name == "1 device"
                else T.make_mesh((4, 2, 1)))
        _RUNS[name] = run_compiled(mesh)
    return _RUNS[name]


def reference_loop(init_state, n_steps=N_STEPS, rows=slice(None)):
    """The same training written out: per step the pre-BN activations h = x W of the CURRENT
    params (before the update), running mean/var <- m * old + (1 - m) * batch mean / biased var of
    h (flax's convention) over `rows` of the batch, and an optax update of jax.grad of the loss."""
    tx, _ = T.make_optimizer(OPT)
    params = jax.tree_util.tree_map(jnp.asarray, init_state.params)
    opt = tx.init(params)
    mean = np.zeros(F, np.float64)
    var = np.ones(F, np.float64)
    hist = np.zeros(D, np.float64)

    def plain_loss(p, batch):
        out, _ = MODULE.apply({"params": p, "batch_stats": init_state.model_state["encoder"]},
                              batch["x"], train=True, mutable=["batch_stats"])
        return jnp.mean((out - batch["y"]) ** 2), out

    grad_fn = jax.jit(jax.grad(plain_loss, has_aux=True))
    for i in range(n_steps):
        batch = _batch(i)
        w = np.asarray(params["dense_in"]["kernel"], np.float64)
        h = (batch["x"].astype(np.float64) @ w)[rows]
        mean = MOMENTUM * mean + (1 - MOMENTUM) * h.mean(0)
        var = MOMENTUM * var + (1 - MOMENTUM) * h.var(0)
        grads, out = grad_fn(params, batch)
        err = (np.asarray(out, np.float64) - batch["y"]) ** 2
        hist = HIST * hist + (1 - HIST) * err.mean(0)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt, "mean": mean, "var": var, "hist": hist}


@pytest.fixture(scope="module")
def one_device():
    run = get_run("1 device")
    run["ref"] = reference_loop(_as_state(run["init"]))
    return run


def _as_state(host_state):
    return jax.tree_util.tree_map(jnp.asarray, host_state)


# ------------------------------------------------------------------------------ tests
def test_batchnorm_statistics_and_params_match_an_explicit_loop(one_device):
    state, ref = one_device["state"], one_device["ref"]
    ms = T.to_host(state.model_state)
    bs = ms["encoder"]["bn"]
    # the running statistics are the momentum-EMA of the per-batch statistics (closed form)
    np.testing.assert_allclose(bs["mean"], ref["mean"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(bs["var"], ref["var"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ms["objective"]["hist"], ref["hist"], rtol=2e-5, atol=1e-7)
    # ... and they moved well away from their initial (0, 1): the comparison is not vacuous
    assert np.abs(bs["mean"]).max() > 0.3 and np.abs(bs["var"] - 1).max() > 0.3
    assert int(ms["objective"]["n"]) == N_STEPS and ms["objective"]["n"].dtype == np.int32
    assert {k: v.dtype for k, v in bs.items()} == {"mean": np.float32, "var": np.float32}
    # parameters and optimiser state equal the reference loop's
    assert_tree_close(state.params, ref["params"], rtol=1e-6, atol=1e-7, what="params")
    assert_tree_close(state.opt_state, ref["opt_state"], rtol=1e-5, atol=1e-8, what="opt")
    assert max(np.abs(a - b).max() for a, b in zip(_leaves(state.params),
                                                    _leaves(one_device["init"].params))) > 1e-3
    # EMA and optimiser only ever see the params; the model_state is not a metric
    assert jax.tree_util.tree_structure(state.ema["0p9"]) == jax.tree_util.tree_structure(
        state.params)
    assert set(one_device["metrics"][0]) == {"loss", "mse", "grad_norm", "learning_rate"}


def test_counter_once_per_step_and_per_micro_step():
    def counting_loss(params, batch, rng, model_state):
        loss = jnp.sum((params["w"] - jnp.mean(batch["x"])) ** 2)
        return loss, {"model_state": {"n": model_state["n"] + 1,
                                      "seen": model_state["seen"] + batch["x"].shape[0]}}

    def init_ms(key):
        del key
        return {"n": jnp.zeros((), jnp.int32), "seen": jnp.zeros((), jnp.float32)}

    for k in (1, 2):
        opt = T.OptimizerConfig(learning_rate=0.1, grad_clip_norm=None, grad_accum_steps=k)
        tx, schedule = T.make_optimizer(opt)
        init_fn = T.make_init_fn(lambda key: {"w": jnp.ones(3)}, tx, (0.5,),
                                 init_model_state_fn=init_ms)
        state = jax.jit(lambda r: nn.unbox(init_fn(r)))(jax.random.PRNGKey(0))
        assert state.is_stateful
        step = jax.jit(T.make_train_step(counting_loss, tx, schedule, grad_accum_steps=k))
        for i in range(4):
            old_w = np.asarray(state.params["w"])
            state, metrics = step(state, {"x": np.full((4, 2), float(i), np.float32)},
                                  jax.random.PRNGKey(i))
            assert int(state.model_state["n"]) == i + 1, f"k={k} micro-step {i}"
            assert state.model_state["n"].dtype == jnp.int32
            assert float(state.model_state["seen"]) == 4.0 * (i + 1)
            applied = (i + 1) % k == 0            # MultiSteps applies every k-th micro-step
            assert (np.abs(np.asarray(state.params["w"]) - old_w).max() > 0) == applied, (k, i)
            assert not any(m.startswith("model_state") for m in metrics)


def test_checkpoint_round_trip_keeps_model_state(one_device, tmp_path):
    state = one_device["state"]
    abstract = one_device["init_obj"].abstract
    with T.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        assert ck.save(N_STEPS, state)
    with T.Checkpointer(tmp_path / "ck") as ck:
        r = ck.restore(abstract)
    assert r.step == N_STEPS
    assert_tree_equal(r.state, state, what="restored ")
    assert int(r.state.model_state["objective"]["n"]) == N_STEPS
    assert r.state.model_state["encoder"]["bn"]["mean"].sharding.is_fully_replicated


def test_checkpoint_without_model_state_still_restores(tmp_path):
    """A checkpoint written before `model_state` existed (the other fields only) restores into a
    plain state (model_state {})."""
    mesh = T.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx, _ = T.make_optimizer(OPT)
    init = T.init_train_state(T.make_init_fn(init_params_fn, tx, (0.9,)), mesh,
                              jax.random.PRNGKey(0))
    assert init.state.model_state == {} and not init.state.is_stateful
    s = init.state
    old = {"step": s.step, "params": s.params, "opt_state": s.opt_state, "ema": s.ema,
           "rng": s.rng}
    with T.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(7, old)
    with T.Checkpointer(tmp_path / "ck") as ck:
        r = ck.restore(init.abstract)
    assert isinstance(r.state, T.TrainState) and r.state.model_state == {}
    assert_tree_equal(r.state, s, what="legacy ")


class _ListIterator:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        if self.i >= len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def test_resume_through_train_is_bit_exact(tmp_path):
    batches = [_batch(i, n=8) for i in range(6)]
    cfg = T.TrainConfig(num_steps=6, seed=3, mesh_shape=(1, -1, 1), optimizer=OPT,
                        ema_decays=(0.9,), ema_warmup=True, log_every=1, checkpoint_every=3,
                        max_to_keep=2, async_checkpointing=False)

    def run(workdir, num_steps):
        return T.train(cfg, bn_loss, init_params_fn, _ListIterator(batches), workdir, num_steps,
                       mesh=T.make_mesh((1, 2, 1), devices=jax.devices()[:2]),
                       handle_sigterm=False, init_model_state_fn=init_model_state_fn)

    ref = run(tmp_path / "ref", 6)
    first = run(tmp_path / "resumed", 3)
    assert first.step == 3 and int(first.state.model_state["objective"]["n"]) == 3
    second = run(tmp_path / "resumed", 6)
    assert ref.restored_step is None and second.restored_step == 3 and second.step == 6
    assert int(second.state.model_state["objective"]["n"]) == 6
    assert_tree_equal(second.state, ref.state, what="resumed vs uninterrupted ")
    assert [h["loss"] for h in second.history] == [h["loss"] for h in ref.history[3:]]
    # the checkpoint really carries the statistics (they are not re-initialised on resume)
    assert np.abs(np.asarray(second.state.model_state["encoder"]["bn"]["mean"])).max() > 0.3


def test_mesh_keeps_model_state_replicated_and_global_statistics(one_device):
    run = get_run("4x2 data x fsdp")
    state = run["state"]
    ms = state.model_state
    # plain leaves replicated, the boxed ('embed',) history sharded like params ('embed' -> fsdp)
    for leaf in (ms["encoder"]["bn"]["mean"], ms["encoder"]["bn"]["var"], ms["objective"]["n"]):
        assert leaf.sharding.spec == P() and leaf.sharding.is_fully_replicated
    assert ms["objective"]["hist"].sharding.spec == P("fsdp")
    assert ms["objective"]["hist"].addressable_shards[0].data.shape == (D // 2,)
    assert state.params["dense_in"]["kernel"].sharding.spec == P("fsdp")
    # same numbers as on one device (which match the closed form above)
    assert_tree_close(ms, one_device["state"].model_state, rtol=1e-5, atol=1e-6, what="ms ")
    assert_tree_close(state.params, one_device["state"].params, rtol=1e-5, atol=1e-7, what="p ")
    for m8, m1 in zip(run["metrics"], one_device["metrics"]):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    # the statistics are over the GLOBAL batch of 16, not one device's 2 rows
    ref = one_device["ref"]
    bs = T.to_host(ms["encoder"]["bn"])
    np.testing.assert_allclose(bs["mean"], ref["mean"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(bs["var"], ref["var"], rtol=2e-5, atol=2e-6)
    local = reference_loop(_as_state(one_device["init"]), rows=slice(0, B // 8))
    assert np.abs(bs["var"] - local["var"]).max() > 0.1
    assert np.abs(bs["mean"] - local["mean"]).max() > 0.05


def test_model_state_shardings_follow_rules():
    """Specs only: boxed model_state leaves shard by the logical rules, plain ones replicate."""
    tx, _ = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx, init_model_state_fn=init_model_state_fn)
    abstract, sh = T.state_shardings(init_fn, T.make_mesh((1, 8, 1)))
    assert sh.model_state["objective"]["hist"].spec == P("fsdp")
    assert sh.model_state["encoder"]["bn"]["mean"].spec == P()
    assert sh.model_state["objective"]["n"].spec == P()
    assert abstract.model_state["objective"]["n"].dtype == jnp.int32
    _, sh = T.state_shardings(init_fn, T.make_mesh((8, 1, 1)))
    assert {s.spec for s in jax.tree_util.tree_leaves(sh.model_state)} == {P()}


def _pure(loss_fn, init_ms=init_model_state_fn):
    tx, schedule = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx, init_model_state_fn=init_ms)
    state = jax.eval_shape(lambda r: nn.unbox(init_fn(r)), jax.ShapeDtypeStruct((2,), jnp.uint32))
    step = T.make_train_step(loss_fn, tx, schedule)
    batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch(0))
    return lambda: jax.eval_shape(step, state, batch, jax.random.PRNGKey(0))


def test_errors_name_the_problem():
    def forgets_state(params, batch, rng, model_state):
        loss, aux = bn_loss(params, batch, rng, model_state)
        return loss, {"mse": aux["mse"]}

    with pytest.raises(ValueError, match=r"did not return aux\['model_state'\] \(aux: \['mse'\]\)"):
        _pure(forgets_state)()

    def wrong_structure(params, batch, rng, model_state):
        loss, aux = bn_loss(params, batch, rng, model_state)
        aux["model_state"] = aux["model_state"]["encoder"]
        return loss, aux

    with pytest.raises(ValueError, match="returned aux\\['model_state'\\] with tree structure"):
        _pure(wrong_structure)()

    def wrong_shape(params, batch, rng, model_state):
        loss, aux = bn_loss(params, batch, rng, model_state)
        aux["model_state"]["objective"]["hist"] = jnp.zeros((D + 1,))
        return loss, aux

    with pytest.raises(ValueError, match=r"\['objective'\]\['hist'\] has shape \(9,\), the state "
                                         r"has \(8,\)"):
        _pure(wrong_shape)()

    def wrong_kind(params, batch, rng, model_state):
        loss, aux = bn_loss(params, batch, rng, model_state)
        aux["model_state"]["objective"]["n"] = jnp.float32(1.0)
        return loss, aux

    with pytest.raises(ValueError, match=r"\['n'\] has dtype float32, the state has int32"):
        _pure(wrong_kind)()

    def plain_loss(params, batch, rng):
        return jnp.float32(0.0), {}

    with pytest.raises(ValueError, match="does not take a model_state argument"):
        _pure(plain_loss)()
    with pytest.raises(ValueError, match="pass init_model_state_fn"):
        _pure(bn_loss, init_ms=None)()

    def returns_state(params, batch, rng):
        return jnp.float32(0.0), {"model_state": {"n": jnp.zeros((), jnp.int32)}}

    with pytest.raises(ValueError, match="but state.model_state has none"):
        _pure(returns_state, init_ms=None)()
    with pytest.raises(ValueError, match=r"collections \['batch_stats', 'params'\]"):
        T.abstract_train_state(T.make_init_fn(lambda k: MODULE.init(k, X0, train=False),
                                              T.make_optimizer(OPT)[0]))


def test_plain_losses_unchanged():
    """A 3-argument loss with an empty model_state behaves as before (and may return an empty
    aux['model_state'], e.g. an autoencoder loss without BatchNorm: it is dropped)."""
    def loss3(params, batch, rng, model_state=None):
        assert model_state is None                 # called with 3 arguments
        stats = {"bn": {"mean": jnp.zeros(F), "var": jnp.ones(F)}}
        out = MODULE.apply({"params": params, "batch_stats": stats}, batch["x"], train=False)
        loss = jnp.mean((out - batch["y"]) ** 2)
        return loss, {"mse": loss, "model_state": {"encoder": {}, "objective": {}}}

    tx, schedule = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx)
    state = jax.jit(lambda r: nn.unbox(init_fn(r)))(jax.random.PRNGKey(0))
    new, metrics = jax.jit(T.make_train_step(loss3, tx, schedule))(state, _batch(0),
                                                                  jax.random.PRNGKey(1))
    assert new.model_state == {} and set(metrics) == {"loss", "mse", "grad_norm", "learning_rate"}
    assert int(new.step) == 1
