"""Tests for diffusion_jax.networks (tiny models; compiled functions shared via module fixtures)."""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from diffusion_jax import networks as N  # noqa: E402

B, H, W, C, ZD, NC = 2, 16, 16, 3, 8, 10
_rs = np.random.RandomState(0)
X = _rs.standard_normal((B, H, W, C)).astype(np.float32)
T = np.array([0.3, 0.7], np.float32)
Z1, Z2 = (_rs.standard_normal((B, ZD)).astype(np.float32) for _ in range(2))
LAB1, LAB2 = np.array([1, 2], np.int32), np.array([3, 4], np.int32)
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
Z_PARAM_NAMES = {"adagn_scale": "z_scale", "adagn_scale_shift": "z_scale_shift",
                 "cross_attn": "z_token", "time_add": "z_temb"}


def random_params(abstract_params, seed):
    """Random float32 NumPy params for an abstract tree (no init compile; every layer active).

    Kernels ~ N(0, 1/fan_in), norm scales 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1).
    """
    rs = np.random.RandomState(seed)

    def make(path, s):
        x = rs.standard_normal(s.shape).astype(np.float32)
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return 1.0 + 0.1 * x
        if name == "kernel":
            return x / np.float32(math.sqrt(math.prod(s.shape[:-1])))
        return 0.1 * x

    return jax.tree_util.tree_map_with_path(make, nn.unbox(abstract_params))


# Cheaper XLA:CPU compiles for the test-only jits (LLVM -O0); numerics are unaffected.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def differ(a, b, tol=1e-4):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) > tol


def rbg(seed):
    """Cheap-to-compile PRNG keys (init / dropout); the tests do not depend on the RNG impl."""
    return jax.random.key(seed, impl="unsafe_rbg")


class Model:
    """A module, its abstract variables, random params (+ real init if asked), jitted apply_fn."""

    def __init__(self, module, cond_example=None, real_init=False, seed=0):
        self.module = module
        self.abstract = N.abstract_variables(module, X.shape, cond_example)
        self.params = random_params(self.abstract["params"], seed)
        self.init = (N.init_params(module, rbg(seed), X.shape, cond_example)
                     if real_init else None)
        self.apply = jax.jit(N.make_apply_fn(module), static_argnames=("train",), **FAST)

    def __call__(self, cond=None, params=None, t=T, **kw):
        return np.asarray(self.apply(self.params if params is None else params, X, t, cond, **kw))


@pytest.fixture(scope="module")
def unet_cond():
    """f32 UNet with dropout, classes and every z-conditioning path at once."""
    m = N.UNet(**TINY, dropout=0.1, num_classes=NC, z_conditioning=tuple(Z_PARAM_NAMES))
    return Model(m, {"label": LAB1, "z": Z1})


@pytest.fixture(scope="module")
def unet_bf16():
    """bf16 UNet on the NCSN++-style options (no z conditioning: cond['z'] must be ignored)."""
    m = N.UNet(**TINY, dropout=0.0, time_embedding="fourier", time_scale=1.0,
               resblock_updown=True, resample_with_conv=False, scale_shift_norm=True,
               skip_rescale=True, head_dim=8, out_channels=2 * C, dtype=jnp.bfloat16)
    return Model(m)


@pytest.fixture(scope="module")
def dit_cond():
    m = N.DiT(patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=NC,
              z_conditioning=("time_add",))
    return Model(m, {"label": LAB1, "z": Z1}, real_init=True)


@pytest.fixture(scope="module")
def dit_bf16():
    m = N.DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, out_channels=2 * C,
              dtype=jnp.bfloat16)
    return Model(m, real_init=True)


def _dtypes(tree):
    return {p.dtype for p in jax.tree_util.tree_leaves(nn.unbox(tree))}


# ---------------------------------------------------------------- shapes, dtypes, mixed precision

def test_unet_shapes_and_dtypes(unet_cond, unet_bf16):
    out = unet_cond({"label": LAB1, "z": Z1})
    assert out.shape == (B, H, W, C) and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).max() > 1e-3
    out = unet_bf16({"z": Z1})
    assert out.shape == (B, H, W, 2 * C) and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).max() > 1e-3
    for model in (unet_cond, unet_bf16):
        assert _dtypes(model.abstract["params"]) == {jnp.dtype(jnp.float32)}


def test_dit_shapes_dtypes_and_zero_init(dit_cond, dit_bf16):
    for model, c_out, cond in ((dit_cond, C, {"label": LAB1, "z": Z1}),
                               (dit_bf16, 2 * C, {"z": Z1})):
        assert _dtypes(model.init) == {jnp.dtype(jnp.float32)}
        out0 = model(cond, params=model.init)
        assert out0.shape == (B, H, W, c_out) and out0.dtype == np.float32
        np.testing.assert_array_equal(out0, 0.0)   # adaLN-Zero: zero-initialised final layer
        out = model(cond)
        assert out.dtype == np.float32 and np.abs(out).max() > 1e-3


def test_bf16_close_to_f32(dit_bf16):
    m32 = dit_bf16.module.clone(dtype=jnp.float32)
    out32 = np.asarray(jax.jit(N.make_apply_fn(m32), **FAST)(dit_bf16.params, X, T, {"z": Z1}))
    out16 = dit_bf16({"z": Z1})
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 0 < rel < 0.05, rel


# ---------------------------------------------------------------- conditioning paths

def test_label_conditioning(unet_cond, dit_cond):
    for model in (unet_cond, dit_cond):
        a = model({"label": LAB1, "z": Z1})
        assert differ(a, model({"label": LAB2, "z": Z1}))
        assert differ(a, model({"label": np.full((B,), NC, np.int32), "z": Z1}))   # null class row
    # a missing label is the null class `num_classes` (classifier-free guidance); a scalar t is
    # broadcast over the batch (one extra compile, so checked on the cheap DiT only)
    null = dit_cond({"label": np.full((B,), NC, np.int32), "z": Z1},
                    t=np.full((B,), 0.3, np.float32))
    np.testing.assert_allclose(dit_cond({"z": Z1}, t=np.float32(0.3)), null, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", list(Z_PARAM_NAMES))
def test_each_z_path_changes_output(unet_cond, mode):
    """Zero the parameters of every other z path: z must still change the output through `mode`."""
    others = {v for k, v in Z_PARAM_NAMES.items() if k != mode}

    def keep_only(path, p):
        return np.zeros_like(p) if any(getattr(k, "key", None) in others for k in path) else p

    params = jax.tree_util.tree_map_with_path(keep_only, unet_cond.params)
    a = unet_cond({"label": LAB1, "z": Z1}, params=params)
    assert differ(a, unet_cond({"label": LAB1, "z": Z2}, params=params))
    # and with every z path zeroed, z has no effect at all
    params0 = jax.tree_util.tree_map_with_path(
        lambda path, p: np.zeros_like(p) if any(
            getattr(k, "key", None) in Z_PARAM_NAMES.values() for k in path) else p,
        unet_cond.params)
    np.testing.assert_array_equal(unet_cond({"label": LAB1, "z": Z1}, params=params0),
                                  unet_cond({"label": LAB1, "z": Z2}, params=params0))


def test_z_ignored_without_z_conditioning(unet_bf16, dit_bf16):
    for model in (unet_bf16, dit_bf16):
        np.testing.assert_array_equal(model({"z": Z1}), model({"z": Z2}))


def test_dit_z_changes_output(dit_cond):
    assert differ(dit_cond({"label": LAB1, "z": Z1}), dit_cond({"label": LAB1, "z": Z2}))


def test_missing_z_raises():
    m = N.UNet(**TINY, z_conditioning=("adagn_scale",))
    with pytest.raises(ValueError, match="cond\\['z'\\]"):
        jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), X, T))
    with pytest.raises(ValueError, match="unknown z_conditioning"):
        jax.eval_shape(lambda: N.UNet(**TINY, z_conditioning=("nope",)).init(
            jax.random.PRNGKey(0), X, T))


# ---------------------------------------------------------------- time embedding

def test_time_changes_output(unet_cond, unet_bf16, dit_bf16):
    cond = {"label": LAB1, "z": Z1}
    assert differ(unet_cond(cond), unet_cond(cond, t=T + 0.1))
    assert differ(unet_bf16({"z": Z1}), unet_bf16({"z": Z1}, t=T + 0.1), tol=1e-3)
    assert differ(dit_bf16({"z": Z1}), dit_bf16({"z": Z1}, t=T + 0.1), tol=1e-3)


def test_sinusoidal_closed_form():
    t, dim = np.array([0.0, 1.0, 250.0], np.float32), 8
    w = np.array([10000.0 ** (-k / 3) for k in range(4)])
    want = np.concatenate([np.sin(t[:, None] * w), np.cos(t[:, None] * w)], axis=1)
    emb = jax.jit(N.sinusoidal_embedding, static_argnums=1)
    got = np.asarray(emb(t, dim))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0], [0] * 4 + [1] * 4)
    assert emb(t, 9).shape == (3, 9)


def test_fourier_embedding():
    emb = jax.jit(N.fourier_embedding, static_argnums=(1, 2))
    t = np.array([0.0, 0.5], np.float32)
    e = np.asarray(emb(t, 16, 2.0))
    assert e.shape == (2, 16) and e.dtype == np.float32
    np.testing.assert_allclose(e[0], [0] * 8 + [1] * 8)
    np.testing.assert_allclose(np.sum(e[:, :8] ** 2 + e[:, 8:] ** 2, -1), [8, 8], rtol=1e-5)
    np.testing.assert_array_equal(e, np.asarray(emb(t, 16, 2.0)))   # fixed frequencies


def test_log_time_input_embeds_log_t(unet_bf16):
    """time_input='log' (CLD-SGM / NCSN++): the network at t is the 'linear' network at log t,
    with the same parameters; t = 0 stays finite (floored at 1e-8)."""
    logged = Model(unet_bf16.module.clone(time_input="log"))
    np.testing.assert_array_equal(logged(params=unet_bf16.params),
                                  unet_bf16(t=np.log(T).astype(np.float32)))
    assert np.all(np.isfinite(logged(params=unet_bf16.params, t=np.zeros_like(T))))
    from diffusion_jax.networks.embeddings import time_input
    np.testing.assert_allclose(time_input(np.array([1.0, np.e]), "log", 2.0, 0.5), [-0.5, 1.5])
    with pytest.raises(ValueError, match="unknown time input 'sqrt'"):
        time_input(T, "sqrt")


# ---------------------------------------------------------------- feature readouts

def _sown(module, params, cond=None, shape=X.shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    _, state = jax.eval_shape(lambda p, x: module.apply(
        {"params": p}, x, T, cond, mutable=["intermediates"]), params, x)
    return state["intermediates"]


@pytest.mark.parametrize("which", ["unet_cond", "unet_bf16", "dit_bf16"])
def test_block_names_match_sown(which, request):
    model = request.getfixturevalue(which)
    cond = {"label": LAB1, "z": Z1} if which == "unet_cond" else None
    sown = _sown(model.module, model.params, cond)
    names = N.block_names(model.module, X.shape)
    assert sorted(sown) == sorted(names)
    for name, info in names.items():
        (feat,) = sown[name]
        assert feat.shape == (B,) + info.shape, name
        assert feat.dtype == model.module.dtype


def test_block_names_unet_scheme():
    names = N.block_names(N.UNet(), (32, 32, 3))
    assert list(names)[:3] == ["down_0_0", "down_0_1", "down_1_0"]
    assert names["down_3_1"] == N.FeatureInfo((4, 4, 256), 8)
    assert names["mid"] == N.FeatureInfo((4, 4, 256), 8)
    assert list(names)[9:12] == ["up_3_0", "up_3_1", "up_3_2"]
    assert names["up_0_2"] == N.FeatureInfo((32, 32, 128), 1)
    assert len(names) == 8 + 1 + 12
    assert list(N.block_names(N.make_dit("DiT-S/4"), (32, 32, 4))) == [
        f"block_{i}" for i in range(12)]


# ---------------------------------------------------------------- sharding metadata

def _boxes(tree):
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@pytest.mark.parametrize("make", [
    lambda: (N.UNet(**TINY, num_classes=NC, z_conditioning=tuple(Z_PARAM_NAMES)),
             {"label": LAB1, "z": Z1}),
    lambda: (N.DiT(patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=NC,
                   z_conditioning=("time_add",)), {"label": LAB1, "z": Z1}),
], ids=["unet", "dit"])
def test_logical_partitioning(make):
    module, cond = make()
    abstract = N.abstract_variables(module, X.shape, cond)
    known = {name for name, _ in N.DEFAULT_LOGICAL_AXIS_RULES}
    leaves = _boxes(abstract["params"])
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= known and set(leaf.names) <= set(N.LOGICAL_AXIS_NAMES)
        if leaf.value.ndim == 1:   # biases, norm scales: replicated
            assert leaf.names[0] in ("bias", "norm")
    specs = jax.tree_util.tree_leaves(N.logical_param_specs(abstract["params"]),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(specs) == len(leaves) and all(isinstance(s, PartitionSpec) for s in specs)

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    shardings = N.param_shardings(abstract["params"], mesh)
    shapes = nn.unbox(abstract["params"])
    n_sharded = 0
    for sh, leaf in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(shapes)):
        assert sh.mesh is mesh or sh.mesh == mesh
        for dim, axis in zip(leaf.shape, tuple(sh.spec) + (None,) * leaf.ndim):
            if axis is not None:
                axes = (axis,) if isinstance(axis, str) else axis
                size = math.prod(mesh.shape[a] for a in axes)
                assert dim % size == 0
                n_sharded += 1
        if leaf.ndim == 1:
            assert all(a is None for a in sh.spec)
    assert n_sharded > 0
    # the shardings are usable: place real parameters on the mesh
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    placed = jax.device_put(params, shardings)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), placed, shardings))


def test_param_shardings_fall_back_to_replication():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    module = N.UNet(**TINY)
    abstract = N.abstract_variables(module, X.shape)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    sh = N.param_shardings(abstract["params"], mesh)
    # conv_in kernel (3, 3, 3, 16): 3 input channels are not divisible by fsdp=8 -> replicated
    assert tuple(sh["conv_in"]["kernel"].spec) == ()
    # down_1_0 conv1 kernel (3, 3, 16, 32): input channels sharded over fsdp
    assert tuple(sh["down_1_0_res"]["conv1"]["kernel"].spec) == (None, None, "fsdp")
    # a mesh without a 'tensor' axis is fine too
    mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    sh2 = N.param_shardings(abstract["params"], mesh2)
    assert tuple(sh2["down_1_0_res"]["conv1"]["kernel"].spec) == (None, None, "fsdp")


# ---------------------------------------------------------------- dropout / apply_fn

def test_dropout(unet_cond):
    cond = {"label": LAB1, "z": Z1}
    k1, k2 = rbg(10), rbg(11)
    a = unet_cond(cond, train=True, rng=k1)
    assert differ(a, unet_cond(cond, train=True, rng=k2))
    np.testing.assert_array_equal(a, unet_cond(cond, train=True, rng=k1))
    np.testing.assert_array_equal(unet_cond(cond, train=False, rng=k1),
                                  unet_cond(cond, train=False, rng=k2))
    with pytest.raises(ValueError, match="rng"):
        N.make_apply_fn(unet_cond.module)(unet_cond.params, X, T, cond, train=True)


# ---------------------------------------------------------------- reference sizes

def _count(module, shape, cond=None):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(
        nn.unbox(N.abstract_variables(module, shape, cond)["params"])))


def test_ddpm_cifar10_param_count():
    m = N.UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    n = _count(m, (1, 32, 32, 3))
    assert abs(n - 35.7e6) / 35.7e6 < 0.03, n
    # exact count of the original DDPM TF layout (attention after every up-path ResBlock at 16x16;
    # score_sde's ddpm.py attends once per up level instead: 35.22M)
    assert n == 35_746_307


def test_dit_configs():
    assert N.dit_config("DiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert N.dit_config("S") == dict(depth=12, hidden_size=384, num_heads=6)
    m = N.make_dit("DiT-S/8", num_classes=1000)
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (12, 384, 6, 8)
    # DiT-XL/2 on 32x32x4 latents, 1000 classes, learned sigma: the paper's 675M (its count includes
    # the fixed 256 x 1152 positional embedding, which is a constant here, not a parameter)
    m = N.make_dit("DiT-XL/2", num_classes=1000, out_channels=8)
    d, p = 1152, 2
    want = (28 * (18 * d * d + 15 * d)                  # qkv, proj, fc1, fc2, adaLN per block
            + p * p * 4 * d + d                         # patch embedding
            + 256 * d + d + d * d + d                   # timestep MLP
            + 1001 * d                                  # class table with the null class
            + d * 2 * d + 2 * d + d * p * p * 8 + p * p * 8)   # final adaLN + linear
    n = _count(m, (1, 32, 32, 4), {"label": jnp.zeros((1,), jnp.int32)})
    assert n == want and abs(n + 256 * d - 675e6) / 675e6 < 0.01, n
    with pytest.raises(ValueError):
        N.dit_config("DiT-M/2")
