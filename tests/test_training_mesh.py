"""Sharded training on 8 host CPU devices: the step on meshes 8x1 (data), 2x4 (data x fsdp) and
1x8 (fsdp) equals the 1-device step, and parameters are laid out as the logical rules say."""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import logging  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import _train_common as common  # noqa: E402
from diffusion_jax import training as T  # noqa: E402

if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices, jax was imported with {jax.device_count()}: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)",
                allow_module_level=True)

B = 8
OPT = T.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, grad_clip_norm=1.0, weight_decay=0.01)
EMA = (0.9, 0.999)
MESHES = {"8x1 data": (8, 1, 1), "2x4 data x fsdp": (2, 4, 1), "1x8 fsdp": (1, 8, 1)}


def _batch(seed=0):
    rs = np.random.RandomState(seed)
    return {"x": rs.uniform(-1, 1, (B, common.H, common.W, common.C)).astype(np.float32)}


def run_steps(mesh, n_steps=2):
    """Init on `mesh`, then `n_steps` compiled steps; returns host copies of everything."""
    _, init_params_fn, loss_fn = common.make_model()
    tx, schedule = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx, EMA)
    init = T.init_train_state(init_fn, mesh, jax.random.PRNGKey(0))
    step = T.compile_train_step(
        T.make_train_step(loss_fn, tx, schedule, ema_warmup=True, return_grads=True),
        init.abstract, T.batch_spec_of(_batch()), mesh)
    out = {"init": T.to_host(init.state.params), "compile_seconds": step.compile_seconds}
    state, per_step = init.state, []
    for i in range(n_steps):
        state, metrics = step(state, _batch(i))
        per_step.append(T.to_host(metrics))
    out.update(steps=per_step, params=T.to_host(state.params), ema=T.to_host(state.ema),
               opt_state=T.to_host(state.opt_state), state=state)
    return out


_RUNS = {}


def get_run(name):
    """run_steps on MESHES[name] ('1 device' = the reference), computed once per module."""
    if name not in _RUNS:
        mesh = (T.make_mesh((1, 1, 1), devices=jax.devices()[:1]) if name == "1 device"
                else T.make_mesh(MESHES[name]))
        with _capture_fallback_logs() as records:
            _RUNS[name] = run_steps(mesh)
        _RUNS[name]["logs"] = [r.getMessage() for r in records]
    return _RUNS[name]


class _capture_fallback_logs(logging.Handler):
    def __enter__(self):
        self.records = []
        self.logger = logging.getLogger("diffusion_jax.training.mesh")
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def reference():
    return get_run("1 device")


def assert_tree_close(a, b, rtol=1e-5, atol=1e-7, what=""):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, what
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_mesh_shape_resolution():
    assert T.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert T.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    assert T.resolve_mesh_shape({"fsdp": 4, "data": -1}, 8) == (2, 4, 1)
    mesh = T.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match=r"needs 6 devices, but there are 8"):
        T.resolve_mesh_shape((3, 2, 1), 8)
    with pytest.raises(ValueError, match=r"needs 9 devices, but there are 8"):
        T.make_mesh((3, 3, 1))
    # fixed sizes asking for fewer devices take the first ones (one process)
    small = T.make_mesh((3, 2, 1))
    assert dict(small.shape) == {"data": 3, "fsdp": 2, "tensor": 1}
    assert set(small.devices.ravel()) == set(jax.devices()[:6])
    one = T.make_mesh({"data": 1})
    assert one.size == 1 and one.devices.ravel()[0] == jax.devices()[0]
    with pytest.raises(ValueError, match="do not divide by"):
        T.make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        T.make_mesh((-1, -1, 1))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_matches_single_device(reference, name):
    got = get_run(name)
    assert_tree_close(got["init"], reference["init"], rtol=0, atol=0, what="init ")
    for i, (g, r) in enumerate(zip(got["steps"], reference["steps"])):
        for k in ("loss", "grad_norm", "learning_rate", "mse"):
            np.testing.assert_allclose(g[k], r[k], rtol=1e-5, err_msg=f"step {i} {k}")
        assert_tree_close(g["grads"], r["grads"], rtol=1e-5, atol=1e-7, what=f"step {i} grads ")
    assert_tree_close(got["params"], reference["params"], rtol=1e-5, atol=1e-7, what="params ")
    assert_tree_close(got["ema"], reference["ema"], rtol=1e-5, atol=1e-7, what="ema ")
    assert_tree_close(got["opt_state"], reference["opt_state"], rtol=1e-5, atol=1e-9, what="opt ")
    # the step really changed the parameters (so the comparison is not vacuous)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(got["params"]), jax.tree_util.tree_leaves(got["init"])))
    assert moved > 1e-3


def _specs(state):
    return jax.tree_util.tree_map(lambda a: a.sharding.spec, state)


@pytest.mark.parametrize("name", ["2x4 data x fsdp", "1x8 fsdp"])
def test_parameters_sharded_by_rules(name):
    """The trained state of the parity run (sharded init + 2 donated steps keep the layout)."""
    fsdp = MESHES[name][1]
    run = get_run(name)
    state = run["state"]
    params = state.params
    # ('embed', 'mlp') kernel (16, 64): embed -> fsdp; mlp -> tensor (size 1, dropped)
    assert params["mlp_in"]["kernel"].sharding.spec == P("fsdp")
    assert params["mlp_in"]["kernel"].addressable_shards[0].data.shape == (16 // fsdp, 64)
    # ('mlp', 'embed') kernel (64, 16)
    assert params["mlp_out"]["kernel"].sharding.spec == P(None, "fsdp")
    assert params["mlp_out"]["kernel"].addressable_shards[0].data.shape == (64, 16 // fsdp)
    # conv kernel (3, 3, ch=16, C=2): conv_in -> fsdp
    assert params["conv_out"]["kernel"].sharding.spec == P(None, None, "fsdp")
    # conv kernel (3, 3, C=2, 16): 2 input channels do not divide by fsdp -> replicated + logged
    assert params["conv_in"]["kernel"].sharding.spec == P()
    assert any("params/conv_in/kernel dim 2" in m and "replicated" in m for m in run["logs"])
    # biases / 'cond' rows replicated
    assert params["mlp_in"]["bias"].sharding.spec == P()
    assert params["temb"]["kernel"].sharding.spec == P(None, "fsdp")
    # optimiser moments and every EMA copy are laid out exactly like the params
    adam = state.opt_state[1][0]
    for tree in (adam.mu, adam.nu, *state.ema.values()):
        assert _specs(tree) == _specs(params)
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


def test_tensor_axis_and_data_only_specs():
    """Specs only (eval_shape, no FLOPs): 'mlp' goes to 'tensor'; pure data parallel replicates."""
    _, init_params_fn, _ = common.make_model()
    tx, _ = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(init_params_fn, tx, EMA)
    _, sh = T.state_shardings(init_fn, T.make_mesh((2, 2, 2)))
    assert sh.params["mlp_in"]["kernel"].spec == P("fsdp", "tensor")
    assert sh.params["mlp_out"]["kernel"].spec == P("tensor", "fsdp")
    assert sh.params["conv_in"]["kernel"].spec == P(None, None, "fsdp", "tensor")
    _, sh = T.state_shardings(init_fn, T.make_mesh((8, 1, 1)))
    assert {s.spec for s in jax.tree_util.tree_leaves(sh)} == {P()}


def test_batch_sharding_and_divisibility():
    mesh = T.make_mesh((2, 4, 1))
    assert T.batch_sharding(mesh).spec == P(("data", "fsdp"))
    arr = T.shard_batch({"x": np.zeros((8, 3), np.float32)}, mesh)["x"]
    assert sorted(s.index[0].start for s in arr.addressable_shards) == list(range(8))
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by the mesh's "
                                         r"batch axes \{'data': 2, 'fsdp': 4\}"):
        T.check_batch_divisible(12, mesh)
    assert T.process_batch_rows(mesh, 8) == (0, 8)


def test_mixed_precision_keeps_float32_state():
    """bf16 network compute: params, grads, moments, EMA and the loss stay float32."""
    mesh = T.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, init_params_fn, loss_fn = common.make_model(dtype=jnp.bfloat16)
    tx, schedule = T.make_optimizer(OPT)
    init = T.init_train_state(T.make_init_fn(init_params_fn, tx, EMA), mesh, jax.random.PRNGKey(0))
    step = T.compile_train_step(T.make_train_step(loss_fn, tx, schedule, return_grads=True),
                                init.abstract, T.batch_spec_of(_batch()), mesh)
    state, metrics = step(init.state, _batch())
    for tree in (state.params, state.ema, metrics["grads"], state.opt_state[1][0].mu):
        assert {a.dtype for a in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert "bf16" in step.compiled.as_text() or "bfloat16" in step.compiled.as_text()


def test_real_unet_state_shardings():
    """The library UNet (tiny): the whole train state follows `networks.param_shardings` on the
    1x8 fsdp mesh (specs only: eval_shape, no compilation)."""
    networks = pytest.importorskip("diffusion_jax.networks")
    module = networks.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                           dropout=0.0)
    x0 = jnp.zeros((1, 8, 8, 2))
    tx, _ = T.make_optimizer(OPT)
    init_fn = T.make_init_fn(lambda k: module.init(k, x0, jnp.zeros((1,)))["params"], tx, EMA)
    mesh = T.make_mesh((1, 8, 1))
    abstract, shardings = T.state_shardings(init_fn, mesh)
    expected = networks.param_shardings(T.abstract_train_state(init_fn).params, mesh)
    exp = jax.tree_util.tree_flatten_with_path(expected)[0]
    ndims = [a.ndim for a in jax.tree_util.tree_leaves(abstract.params)]
    for tree in (shardings.params, shardings.ema[T.ema_key(0.9)], shardings.opt_state[1][0].mu):
        got = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert [p for p, _ in got] == [p for p, _ in exp]
        for (path, e), (_, g), ndim in zip(exp, got, ndims):
            assert e.is_equivalent_to(g, ndim), \
                f"{jax.tree_util.keystr(path)}: {e.spec} vs {g.spec}"
    assert sum("fsdp" in str(g.spec) for g in jax.tree_util.tree_leaves(shardings.params)) >= 5
