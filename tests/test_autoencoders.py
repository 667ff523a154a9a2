"""Tests for diffusion_jax.autoencoders: encoders, latents, model, loss (tiny models, 8x8 images).

Shapes and errors are checked abstractly (`jax.eval_shape`, no compilation); the numerical tests
share a few small jitted functions compiled at LLVM -O0.
"""
import os
import sys

if "jax" not in sys.modules and "host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math  # noqa: E402
import re  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from diffusion_jax import autoencoders as A  # noqa: E402
from diffusion_jax.networks import Z_MODES  # noqa: E402
from diffusion_jax.processes import get_process  # noqa: E402

B, S, C, D = 4, 8, 3, 6
TINY = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
Z_PARAM_NAMES = {"adagn_scale": "z_scale", "adagn_scale_shift": "z_scale_shift",
                 "cross_attn": "z_token", "time_add": "z_temb"}
_rs = np.random.RandomState(0)
X = np.tanh(_rs.standard_normal((B, S, S, C))).astype(np.float32)
T = np.linspace(0.2, 0.8, B).astype(np.float32)
PROCESS = get_process("vp")


def tiny(latent="continuous", encoder="semantic", z_conditioning=("adagn_scale",), **kw):
    enc_opts = {"ch": 8} if encoder == "conv" else None
    return A.make_diffae(z_dim=D, latent=latent, encoder=encoder, encoder_options=enc_opts,
                         z_conditioning=z_conditioning, **{**TINY, **kw})


def abstract_variables(module, shape=(B, S, S, C)):
    x = jnp.zeros(shape)
    return jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), x, jnp.zeros(shape[:1]), x)))


def random_variables(module, seed=0):
    """Random float32 variables (no zero-initialised layer, so every path is active)."""
    rs = np.random.RandomState(seed)

    def make(path, s):
        x = rs.standard_normal(s.shape).astype(np.float32)
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return 1.0 + 0.1 * np.abs(x)
        if name == "kernel":
            return x / np.float32(math.sqrt(math.prod(s.shape[:-1])))
        return 0.1 * x

    return jax.tree_util.tree_map_with_path(make, abstract_variables(module))


def tree_norm(tree):
    return float(optax.tree.norm(tree))


# --- shapes ------------------------------------------------------------------------------------------

def test_encoder_latent_heads_shapes():
    """Every encoder x latent type, in training and evaluation mode (abstract: no compilation)."""
    key = jax.random.PRNGKey(0)
    for encoder in ("semantic", "conv"):
        for latent in A.LATENT_TYPES:
            enc = tiny(latent, encoder).encoder
            v = jax.eval_shape(lambda: enc.init(key, X))
            assert ("batch_stats" in v) == (encoder == "conv")
            for train in (False, True):
                rngs = {"latent": key}
                lat = jax.eval_shape(lambda v: enc.apply(v, X, train=train, rngs=rngs, mutable=["batch_stats"])[0], v)
                width = 2 * D if latent == "binary" else D
                assert lat.z.shape == (B, width) and lat.z.dtype == jnp.float32, (encoder, latent)
                assert lat.kl.shape == (B,)
                assert (lat.logits is not None) == (latent == "binary")
                if latent == "binary":
                    assert lat.logits.shape == (B, D, 2)
                assert (lat.mean is not None) == (latent == "gaussian") == (lat.logvar is not None)
                if latent == "gaussian":
                    assert lat.mean.shape == lat.logvar.shape == (B, D)


def test_model_encode_decode_shapes():
    module = tiny("binary", "conv")
    v = abstract_variables(module)
    assert set(v) == {"params", "batch_stats"} and set(v["params"]) == {"encoder", "decoder"}
    enc = A.encode_fn(module)
    lat, stats = jax.eval_shape(lambda v: enc(v, X, train=True, rng=jax.random.PRNGKey(0)), v)
    assert lat.z.shape == (B, 2 * D)
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(v["batch_stats"])
    out = jax.eval_shape(A.decoder_apply_fn(module), v["params"], X, T, {"z": lat.z})
    assert out.shape == X.shape and out.dtype == jnp.float32
    out = jax.eval_shape(lambda v: module.apply(v, X, T, X), v)        # __call__ = encode then decode
    assert out.shape == X.shape


def test_factories_wire_the_papers_designs():
    diffae = A.make_diffae(**TINY)
    assert isinstance(diffae.encoder, A.SemanticEncoder) and diffae.encoder.z_dim == 512
    assert diffae.encoder.latent == "continuous" and diffae.decoder.scale_shift_norm
    assert tuple(diffae.decoder.z_conditioning) == ("adagn_scale",)
    assert diffae.encoder.ch_mult == TINY["ch_mult"]             # encoder follows the decoder's sizes
    dmz = A.make_dmz(bits=D, time_add=True, **TINY, encoder_options={"ch": 8})
    assert isinstance(dmz.encoder, A.ConvEncoder) and dmz.encoder.norm == "batch"
    assert dmz.encoder.latent == "binary" and dmz.decoder.out_channels == 2 * C
    assert tuple(dmz.decoder.z_conditioning) == ("cross_attn", "time_add")
    v = abstract_variables(dmz)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in
            jax.tree_util.tree_flatten_with_path(v["params"])[0]}
    present = {m for m, name in Z_PARAM_NAMES.items() if any(f"/{name}/" in f for f in flat)}
    assert present == {"cross_attn", "time_add"}
    z = jnp.zeros((B, 2 * D))
    assert jax.eval_shape(A.decoder_apply_fn(dmz), v["params"], X, T, {"z": z}).shape == (B, S, S, 2 * C)
    # learned variance: the sampler sees the first C channels
    assert jax.eval_shape(lambda v: A.decoder_eps_fn(dmz, v)(X, T, {"z": z}), v).shape == X.shape
    for latent in A.LATENT_TYPES:                 # every axis overridable
        m = A.make_dmz(bits=D, latent=latent, encoder="semantic", z_conditioning=("adagn_scale_shift",), **TINY)
        assert m.encoder.latent == latent and tuple(m.decoder.z_conditioning) == ("adagn_scale_shift",)


# --- z-conditioning paths ------------------------------------------------------------------------------

def test_each_z_path_changes_the_output_and_only_when_on():
    """One decoder with all four paths; a path is 'off' when its z-kernel is zero. Each path alone
    changes the output when z changes; with every path off the output ignores z."""
    module = tiny(z_conditioning=Z_MODES)
    v = random_variables(module, seed=1)
    apply_fn = A.decoder_apply_fn(module)
    z1, z2 = (_rs.standard_normal((B, D)).astype(np.float32) for _ in range(2))
    f = jax.jit(lambda p: (apply_fn(p, X, T, {"z": z1}), apply_fn(p, X, T, {"z": z2})), **FAST)

    def only(modes):
        off = {Z_PARAM_NAMES[m] for m in Z_MODES if m not in modes}

        def zero(path, x):
            names = [str(getattr(k, "key", k)) for k in path]
            return np.zeros_like(x) if names[-1] == "kernel" and names[-2] in off else x
        return jax.tree_util.tree_map_with_path(zero, v["params"])

    diffs = {}
    for m in Z_MODES + ("none",):
        a, b = f(only(() if m == "none" else (m,)))
        diffs[m] = float(jnp.max(jnp.abs(a - b)))
    for m in Z_MODES:
        assert diffs[m] > 1e-3, (m, diffs)
    assert diffs["none"] == 0.0, diffs


# --- Gumbel-softmax and binary codes ------------------------------------------------------------------

def test_gumbel_softmax_hard_codes_are_exact_one_hots():
    logits = jnp.asarray(_rs.standard_normal((256, 5, 3)) * 3, jnp.float32)
    key = jax.random.PRNGKey(3)
    taus = (0.3, 1.0, 5.0)
    codes = jax.jit(lambda k, l: [(A.gumbel_softmax(k, l, tau, hard=True), A.gumbel_softmax(k, l, tau))
                                  for tau in taus])(key, logits)
    for hard, soft in codes:
        hard, soft = np.asarray(hard), np.asarray(soft)
        assert set(np.unique(hard)) == {0.0, 1.0}
        assert np.all(hard.sum(-1) == 1.0)
        np.testing.assert_array_equal(hard.argmax(-1), soft.argmax(-1))


def test_gumbel_softmax_soft_is_a_tempered_softmax():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    key = jax.random.PRNGKey(0)
    g = jax.random.gumbel(key, logits.shape)
    for tau in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(A.gumbel_softmax(key, logits, tau), jax.nn.softmax((logits + g) / tau),
                                   rtol=1e-6, atol=1e-7)
    # tau -> 0: the one-hot of the argmax; tau -> infinity: uniform.
    np.testing.assert_allclose(A.gumbel_softmax(None, logits, 1e-2), jax.nn.one_hot([0, 2], 3), atol=1e-6)
    np.testing.assert_allclose(A.gumbel_softmax(None, logits, 1e5), np.full((2, 3), 1 / 3), atol=1e-4)
    # Gumbel-max: argmax frequencies are softmax(logits).
    draws = A.gumbel_softmax(jax.random.PRNGKey(1), jnp.broadcast_to(logits[0], (40000, 3)), hard=True)
    np.testing.assert_allclose(np.asarray(draws).mean(0), jax.nn.softmax(logits[0]), atol=0.01)
    with pytest.raises(ValueError, match="tau > 0"):
        A.gumbel_softmax(key, logits, 0.0)


def test_straight_through_gradient_equals_the_soft_gradient():
    logits = jnp.asarray(_rs.standard_normal((8, 4, 2)), jnp.float32)
    w = jnp.asarray(_rs.standard_normal((8, 4, 2)), jnp.float32)
    key = jax.random.PRNGKey(7)
    g_hard = jax.grad(lambda l: jnp.sum(w * A.gumbel_softmax(key, l, 1.0, hard=True)))(logits)
    g_soft = jax.grad(lambda l: jnp.sum(w * A.gumbel_softmax(key, l, 1.0)))(logits)
    assert float(jnp.min(jnp.abs(g_soft).sum(-1))) > 1e-4          # non-zero for every bit
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)


def test_binary_codes_prior_and_frequencies():
    bits = jnp.asarray([[0, 1, 1], [1, 0, 0]])
    code = A.binary_code(bits)
    np.testing.assert_array_equal(code, [[1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0]])
    np.testing.assert_array_equal(A.bits_from_code(code), bits)
    np.testing.assert_allclose(A.bit_frequencies(code), [0.5, 0.5, 0.5])
    probs = jnp.asarray([0.1, 0.5, 0.9, 0.3])
    z = A.sample_binary_prior(jax.random.PRNGKey(0), 20000, 4, probs)
    assert z.shape == (20000, 8) and np.all(np.asarray(z).reshape(-1, 4, 2).sum(-1) == 1)
    np.testing.assert_allclose(A.bit_frequencies(z), probs, atol=0.012)          # ~ 4 sigma
    np.testing.assert_allclose(A.bit_frequencies(A.sample_binary_prior(jax.random.PRNGKey(1), 20000, 3)),
                               0.5, atol=0.014)
    np.testing.assert_allclose(A.bit_entropy(jnp.asarray([0.0, 0.5, 1.0])), [0.0, 1.0, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match=r"probs must have shape \(d,\)"):
        A.sample_binary_prior(jax.random.PRNGKey(0), 3, 4, probs[:2])


def test_kl_closed_forms():
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, summed over dimensions.
    m = np.array([[0.0, 1.0, -2.0]], np.float32)
    s = np.array([[1.0, 0.5, 2.0]], np.float32)
    want = np.sum(np.log(1 / s) + (s ** 2 + m ** 2) / 2 - 0.5, axis=-1)
    np.testing.assert_allclose(A.gaussian_kl(m, 2 * np.log(s)), want, rtol=1e-6)
    np.testing.assert_allclose(A.gaussian_kl(np.zeros((2, 5)), np.zeros((2, 5))), [0.0, 0.0])
    # KL(q || Bernoulli(1/2)): 0 for uniform q, log 2 per bit for a certain q.
    np.testing.assert_allclose(A.binary_kl(jnp.zeros((2, 3, 2))), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(A.binary_kl(jnp.asarray([[[0.0, 60.0], [-60.0, 0.0]]])), [2 * math.log(2)],
                               rtol=1e-6)
    p = 0.8
    lg = jnp.asarray([[[0.0, math.log(p / (1 - p))]]])
    np.testing.assert_allclose(A.binary_kl(lg), [math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p)],
                               rtol=1e-5)


def test_latent_stats_normalisation():
    z = _rs.standard_normal((500, 7)).astype(np.float32) * np.arange(1, 8) + np.arange(7) - 3
    z[:, 3] = 2.0                                                    # a constant dimension
    stats = A.fit_latent_stats(z)
    np.testing.assert_allclose(stats.mean, z.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.delete(np.asarray(stats.std), 3), np.delete(z.std(0, ddof=1), 3), rtol=1e-5)
    zn = np.asarray(A.normalize(z, stats))
    assert np.all(np.isfinite(zn)) and np.all(zn[:, 3] == 0.0)
    np.testing.assert_allclose(zn.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.delete(zn.std(0, ddof=1), 3), 1.0, rtol=1e-5)
    np.testing.assert_allclose(A.denormalize(zn, stats), z, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        A.fit_latent_stats(z[:1])


# --- the loss ------------------------------------------------------------------------------------------

def as_initialised(params):
    """`params` with the kernels that the real initialisation zeroes (every ResBlock's conv2, the
    attention output projections, conv_out) set to zero, as at step 0."""
    def zero(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        hit = names[0] == "decoder" and names[-1] == "kernel" and names[-2] in ("conv2", "out", "conv_out")
        return np.zeros_like(x) if hit else x
    return jax.tree_util.tree_map_with_path(zero, params)


@pytest.mark.parametrize("latent,encoder", [("continuous", "semantic"), ("gaussian", "semantic"),
                                            ("binary", "conv")])
def test_loss_gradients_reach_the_encoder(latent, encoder):
    """DiffAE issues 63 / 77 ('zero gradient to z_sem'): with every layer active the encoder's gradient
    is non-zero and finite for every latent type (through the reparameterisation / the soft Gumbel
    codes). At initialisation it is exactly zero (the zero-initialised residual and output convs make
    the output independent of z), and three optimiser steps make it non-zero."""
    module = tiny(latent, encoder)
    loss_fn = A.autoencoder_loss(module, PROCESS)
    v = random_variables(module, seed=2)
    state = A.init_model_state(module, v, loss_fn)
    grad = jax.jit(jax.grad(lambda p, k: loss_fn(p, {"x": X}, k, state)[0]), **FAST)

    g = grad(v["params"], jax.random.PRNGKey(2))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    assert float(jnp.linalg.norm(g["encoder"]["head"]["proj"]["kernel"])) > 1e-4
    assert float(jnp.linalg.norm(g["encoder"]["conv_0" if encoder == "conv" else "conv_in"]["kernel"])) > 1e-6

    params = as_initialised(v["params"])
    g0 = grad(params, jax.random.PRNGKey(1))
    assert tree_norm(g0["encoder"]) == 0.0 and tree_norm(g0["decoder"]) > 0.0
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    for i in range(3):
        updates, opt = tx.update(grad(params, jax.random.PRNGKey(10 + i)), opt, params)
        params = optax.apply_updates(params, updates)
    g3 = grad(params, jax.random.PRNGKey(20))
    assert np.isfinite(tree_norm(g3["encoder"])) and tree_norm(g3["encoder"]) > 1e-6


def test_loss_aux_kl_weight_and_batchnorm_state():
    module = tiny("binary", "conv")
    v = random_variables(module, seed=3)
    loss_fn = A.autoencoder_loss(module, PROCESS, kl_weight=0.5)
    state = A.init_model_state(module, v, loss_fn)
    assert set(state) == {"encoder", "objective"} and jax.tree_util.tree_leaves(state["encoder"])
    f = jax.jit(loss_fn, **FAST)
    loss, aux = f(v["params"], {"x": X}, jax.random.PRNGKey(0), state)
    np.testing.assert_allclose(loss, aux["diffusion_loss"] + 0.5 * aux["kl"], rtol=1e-6)
    assert float(aux["kl"]) > 0.0 and 0.0 <= float(aux["bit_entropy"]) <= 1.0
    # BatchNorm: train mode moves the running statistics (momentum 0.9) ...
    new = aux["model_state"]
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    old_mean = np.asarray(state["encoder"]["encoder"]["norm_0"]["mean"])
    new_mean = np.asarray(new["encoder"]["encoder"]["norm_0"]["mean"])
    assert np.all(np.isfinite(new_mean)) and np.max(np.abs(new_mean - old_mean)) > 1e-4
    # ... by exactly 0.9 old + 0.1 (batch mean of the first stride-2 conv's output).
    k = v["params"]["encoder"]["conv_0"]
    h = jax.lax.conv_general_dilated(X, k["kernel"], (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + k["bias"]
    np.testing.assert_allclose(new_mean, 0.9 * old_mean + 0.1 * np.asarray(h).mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    # Eval mode: running statistics unchanged, outputs per-example (independent of the batch).
    enc = jax.jit(A.encode_fn(module), static_argnames="train", **FAST)
    lat, stats = enc(v, X, train=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats, v["batch_stats"])
    lat2, _ = enc(v, X[:2], train=False)
    np.testing.assert_allclose(lat.logits[:2], lat2.logits, rtol=1e-5, atol=1e-6)
    assert set(np.unique(np.asarray(lat.z))) <= {0.0, 1.0}             # eval: hard one-hot codes
    lat_t, stats_t = enc(v, X, train=True, rng=jax.random.PRNGKey(0))
    lat_t2, _ = enc(v, X[:2], train=True, rng=jax.random.PRNGKey(0))
    assert float(jnp.max(jnp.abs(lat_t.logits[:2] - lat_t2.logits))) > 1e-4     # batch statistics
    assert 0.0 < float(jnp.min(lat_t.z)) and float(jnp.max(lat_t.z)) < 1.0       # train: soft codes
    # Called without model_state, a BatchNorm encoder is an error (its statistics would be lost).
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        jax.eval_shape(lambda p: loss_fn(p, {"x": X}, jax.random.PRNGKey(0)), v["params"])


def test_stateless_loss_three_argument_form():
    module = tiny()
    v = abstract_variables(module)
    loss_fn = A.autoencoder_loss(module, PROCESS)
    assert loss_fn.stateful is False
    state = A.init_model_state(module, v, loss_fn)
    assert not jax.tree_util.tree_leaves(state)
    loss, aux = jax.eval_shape(lambda p: loss_fn(p, {"x": X}, jax.random.PRNGKey(0)), v["params"])
    assert "model_state" not in aux and loss.shape == ()
    _, aux = jax.eval_shape(lambda p: loss_fn(p, {"x": X}, jax.random.PRNGKey(0), state), v["params"])
    assert jax.tree_util.tree_structure(aux["model_state"]) == jax.tree_util.tree_structure(state)


def test_composes_with_a_stateful_base_loss():
    """DMZ: BatchNorm encoder + improved DDPM's hybrid loss with loss-aware t sampling (its own state)."""
    from diffusion_jax.objectives import hybrid_loss
    module = A.make_dmz(bits=D, encoder_options={"ch": 8}, **TINY)
    v = abstract_variables(module)
    process = get_process("ddpm", beta_schedule="cosine")
    loss_fn = A.autoencoder_loss(module, process, hybrid_loss, time_sampling="loss_aware")
    assert loss_fn.stateful
    state = A.init_model_state(module, v, loss_fn)
    assert jax.tree_util.tree_leaves(state["encoder"]) and jax.tree_util.tree_leaves(state["objective"])
    loss, aux = jax.eval_shape(lambda p, ms: loss_fn(p, {"x": X}, jax.random.PRNGKey(0), ms), v["params"], state)
    assert loss.shape == () and {"vb", "kl", "bit_entropy", "diffusion_loss"} <= set(aux)
    assert jax.tree_util.tree_structure(aux["model_state"]) == jax.tree_util.tree_structure(state)


def test_traces_in_the_library_train_step():
    """The training layer's stateful-loss protocol end to end (abstractly): init with model_state from
    init_model_state, one train step carries the BatchNorm statistics and the loss history."""
    from diffusion_jax import training as TR
    from diffusion_jax.objectives import hybrid_loss
    module = A.make_dmz(bits=D, encoder_options={"ch": 8}, **TINY)
    process = get_process("ddpm", beta_schedule="cosine")
    loss_fn = A.autoencoder_loss(module, process, hybrid_loss, time_sampling="loss_aware")
    tx, schedule = TR.make_optimizer({"learning_rate": 1e-4})
    init_fn = TR.make_init_fn(
        lambda k: A.init_autoencoder(module, k, (S, S, C), unbox=False)["params"], tx,
        init_model_state_fn=lambda k: A.init_model_state(module, A.init_autoencoder(module, k, (S, S, C)), loss_fn))
    state = jax.eval_shape(lambda k: nn.unbox(init_fn(k)), jax.ShapeDtypeStruct((2,), jnp.uint32))
    step = TR.make_train_step(loss_fn, tx, schedule)
    new, metrics = jax.eval_shape(step, state, {"x": X}, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(new.model_state) == jax.tree_util.tree_structure(state.model_state)
    assert {"encoder", "objective"} == set(new.model_state) and "bit_entropy" in metrics


# --- errors ------------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    conv = tiny("binary", "conv")
    for shape in [(2, 12, 12, 3), (2, 2, 2, 3), (2, 8, 16, 3)]:
        with pytest.raises(ValueError, match=r"H = W = 2\*\*k >= 4.*" + re.escape(str(shape))):
            abstract_variables(conv, shape)
    sem = tiny(ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"divisible by 4.*\(2, 10, 10, 3\)"):
        abstract_variables(sem, (2, 10, 10, 3))
    with pytest.raises(ValueError, match=r"unknown latent type 'vq'.*continuous"):
        tiny("vq")
    with pytest.raises(ValueError, match=r"unknown z_conditioning mode\(s\) \['film'\]"):
        tiny(z_conditioning=("film",))
    with pytest.raises(ValueError, match="needs z_conditioning"):
        tiny(z_conditioning=())
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        A.make_diffae(encoder="vit", **TINY)
    with pytest.raises(ValueError, match="unknown ConvEncoder norm 'layer'"):
        abstract_variables(A.make_dmz(encoder_options={"norm": "layer"}, **TINY))
    with pytest.raises(ValueError, match=r"unknown UNet \(decoder\) options \['chh'\]"):
        A.make_diffae(chh=3)
    module = tiny("gaussian")
    v = abstract_variables(module)
    with pytest.raises(ValueError, match="samples z: pass rng="):
        jax.eval_shape(lambda v: A.encode_fn(module)(v, X, train=True), v)
    with pytest.raises(ValueError, match=r"z must have shape \(B, D\) with B = 4"):
        jax.eval_shape(A.decoder_apply_fn(module), v["params"], X, T, {"z": jnp.zeros((3, D))})
    with pytest.raises(ValueError, match="needs cond="):
        jax.eval_shape(A.decoder_apply_fn(module), v["params"], X, T, None)

