"""DiffAE's latent DDIM (MLPSkipNet + latent sampler on normalised z) and attribute manipulation.

The latent sampler is checked on a closed-form Gaussian mixture in D = 8 whose dimensions have very
different means and scales (so normalisation matters): its samples must be as close to the mixture as
a held-out true sample is, and far closer than the moment-matched Gaussian (the prior, denormalised)
or the untrained network.
"""
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

from diffusion_jax import networks as N  # noqa: E402
from diffusion_jax.autoencoders import latent_sampler as LS  # noqa: E402
from diffusion_jax.autoencoders import latents as LT  # noqa: E402
from diffusion_jax.autoencoders import manipulation as MP  # noqa: E402
from diffusion_jax.networks.mlp import MLPSkipNet  # noqa: E402
from diffusion_jax.reference import metrics  # noqa: E402
from diffusion_jax.reference import mixtures as M  # noqa: E402

D = 8
N_EVAL = 2000


# ------------------------------------------------------------------------------ MLPSkipNet
def _random_params(params, seed):
    """Every leaf replaced by N(0, 1/fan_in) kernels / 0.1 N(0, 1) others (the output layer active)."""
    rs = np.random.RandomState(seed)

    def make(path, p):
        x = rs.standard_normal(p.shape).astype(np.float32)
        if getattr(path[-1], "key", "") == "kernel":
            return x / np.float32(math.sqrt(p.shape[0]))
        return 0.1 * x

    return jax.tree_util.tree_map_with_path(make, params)


def test_mlp_zero_init_output():
    """The output layer is zero-initialised: the untrained denoiser predicts eps = 0 exactly."""
    net = MLPSkipNet(num_layers=3, hidden=32)
    params = N.init_params(net, jax.random.PRNGKey(0), (3, D))
    assert float(jnp.max(jnp.abs(params["out"]["kernel"]))) == 0.0
    assert float(jnp.std(params["layer_1"]["kernel"])) > 0.1  # He-normal hidden kernels
    x = jax.random.normal(jax.random.PRNGKey(1), (3, D))
    out = net.apply({"params": params}, x, jnp.array([0.1, 0.5, 0.9]))
    assert out.shape == (3, D) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0


@pytest.mark.parametrize("mode", ["scale", "scale_shift", "add"])
def test_mlp_shapes_and_time_conditioning(mode):
    net = MLPSkipNet(num_layers=4, hidden=32, time_conditioning=mode)
    params = nn.unbox(N.abstract_variables(net, (3, D))["params"])
    # Skip connections: every layer after the first (and the output) sees [h ; z].
    assert params["layer_0"]["kernel"].shape == (D, 32)
    for i in (1, 2):
        assert params[f"layer_{i}"]["kernel"].shape == (32 + D, 32)
    assert params["out"]["kernel"].shape == (32 + D, D)
    assert "layer_3" not in params
    mod = params["layer_1_time"]["kernel"].shape
    assert mod == (D, 64 if mode == "scale_shift" else 32)  # time MLP width defaults to D
    # With the output layer active, t changes the output (and x does too), per example.
    rp = _random_params(params, 0)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, D))
    t = jnp.array([0.1, 0.5, 0.9])
    a = net.apply({"params": rp}, x, t)
    assert a.shape == (3, D) and a.dtype == jnp.float32
    b = net.apply({"params": rp}, x, t + 0.05)
    c = net.apply({"params": rp}, x + 0.1, t)
    assert float(jnp.min(jnp.max(jnp.abs(a - b), axis=1))) > 1e-3
    assert float(jnp.min(jnp.max(jnp.abs(a - c), axis=1))) > 1e-3
    t2 = t.at[1].set(0.7)  # example 0 does not depend on example 1's time
    np.testing.assert_allclose(net.apply({"params": rp}, x, t2)[0], a[0], rtol=1e-6, atol=1e-6)


def test_mlp_logical_axes_dropout_and_errors():
    net = MLPSkipNet(num_layers=3, hidden=16, dropout=0.5)
    abstract = N.abstract_variables(net, (2, D))
    specs = jax.tree_util.tree_leaves(N.logical_param_specs(abstract["params"]),
                                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract["params"]))
    assert len(specs) == len(leaves) and all(len(s) == 1 or len(s) == 2 for s in specs)
    assert all(name in N.LOGICAL_AXIS_NAMES for s in specs for name in s)
    params = _random_params(nn.unbox(abstract["params"]), 1)
    apply_fn = N.make_apply_fn(net)
    x, t = jnp.ones((2, D)), jnp.full((2,), 0.5)
    ev = apply_fn(params, x, t)
    tr1 = apply_fn(params, x, t, train=True, rng=jax.random.PRNGKey(0))
    tr2 = apply_fn(params, x, t, train=True, rng=jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(tr1 - tr2))) > 1e-4 and float(jnp.max(jnp.abs(ev - tr1))) > 1e-4
    with pytest.raises(ValueError, match="needs rng"):
        apply_fn(params, x, t, train=True)
    with pytest.raises(ValueError, match="unknown time_conditioning"):
        MLPSkipNet(time_conditioning="film").init(jax.random.PRNGKey(0), x, t)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        net.init(jax.random.PRNGKey(0), jnp.ones((2, 4, 4, 1)), t)


# ---------------------------------------------------------------- stats, config and the loss
def test_latent_stats_round_trip_and_errors():
    z = jax.random.normal(jax.random.PRNGKey(0), (500, D)) * jnp.arange(1, D + 1) + 3.0
    st = LT.fit_latent_stats(z)  # DiffAE's conds_mean / conds_std (torch.std: ddof = 1)
    np.testing.assert_allclose(st.mean, np.mean(np.asarray(z), 0), rtol=1e-5)
    np.testing.assert_allclose(st.std, np.std(np.asarray(z), 0, ddof=1), rtol=1e-5)
    zn = LT.normalize(z, st)
    np.testing.assert_allclose(np.mean(zn, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(zn, 0, ddof=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(LT.denormalize(zn, st), z, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        LS.check_stats(jnp.ones((4, D + 1)), st)
    with pytest.raises(ValueError, match="do not match"):
        MP.manipulate(jnp.ones((4, D + 1)), jnp.ones(D + 1), 0.3, st)
    with pytest.raises(ValueError, match="unknown latent loss"):
        LS.LatentSamplerConfig(loss="huber")
    with pytest.raises(ValueError, match="unknown process"):
        LS.LatentSamplerConfig(process="ddim")
    with pytest.raises(ValueError, match="unknown latent sampler options"):
        LS.LatentSamplerConfig.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        LS.train_latent_sampler(jnp.ones((16, 4, 4)), LS.LatentSamplerConfig(num_steps=1))
    const = {"beta_start": 0.008, "beta_end": 0.008}
    cfg = LS.LatentSamplerConfig.from_dict({"process_kwargs": const})
    assert hash(cfg) == hash(LS.LatentSamplerConfig(process_kwargs=tuple(const.items())))
    np.testing.assert_allclose(cfg.make_process().betas(), 0.008)  # DiffAE's const0.008


def test_untrained_loss_closed_form():
    """The zero-initialised network predicts eps = 0, so L1 = E|eps| = sqrt(2/pi) and L2 = E eps^2 = 1
    (Monte-Carlo standard errors 0.002 and 0.005 at 8192 x 8 draws)."""
    cfg = LS.LatentSamplerConfig(num_layers=3, hidden=16)
    net, process = cfg.make_module(), cfg.make_process()
    # Zero output layer => eps_theta = 0 whatever the other parameters: all-zero params suffice.
    params = jax.tree_util.tree_map(jnp.zeros_like,
                                    nn.unbox(N.abstract_variables(net, (1, D))["params"]))
    apply_fn = N.make_apply_fn(net)
    losses = {k: LS.latent_eps_loss(process, apply_fn, loss=k) for k in LS.LATENT_LOSSES}
    x = jax.random.normal(jax.random.PRNGKey(1), (8192, D))
    out = jax.jit(lambda p, b, k: {n: f(p, b, k) for n, f in losses.items()})(
        params, {"x": x}, jax.random.PRNGKey(2))
    for loss, expected in (("l1", math.sqrt(2 / math.pi)), ("l2", 1.0)):
        value, aux = out[loss]
        assert abs(float(value) - expected) < 0.01, (loss, float(value), expected)
        assert abs(float(aux["l1"]) - math.sqrt(2 / math.pi)) < 0.01
        assert abs(float(aux["mse"]) - 1.0) < 0.02


# ------------------------------------------------------------------- training on a mixture
def _scaled_mixture():
    """random_mixture(D = 8, 3 components) under z -> shift + scale z with shifts in [-10, 10] and
    per-dimension scales spanning 0.1 .. 10: the raw dimensions are nothing like N(0, 1)."""
    base = M.random_mixture(1, D, 3)
    rs = np.random.RandomState(0)
    shift = rs.uniform(-10, 10, D)
    scale = np.exp(rs.uniform(np.log(0.1), np.log(10.0), D))
    covs = scale[:, None] * np.asarray(base.covs) * scale[None, :]
    return M.make_mixture(np.asarray(base.weights), shift + scale * np.asarray(base.means), covs)


@pytest.fixture(scope="module")
def mixture_run():
    gm = _scaled_mixture()
    z_train = M.sample(gm, jax.random.PRNGKey(0), 20000)[0]
    # use_norm=False: with DiffAE's LayerNorms a net this small extrapolates badly to the prior's
    # tail in D = 8 (~0.1% of samples land far out; the energy distance barely notices, sliced W2
    # does); the LayerNorm variant is trained in the L1 test below.
    cfg = LS.LatentSamplerConfig(num_layers=4, hidden=64, use_norm=False, loss="l2",
                                 learning_rate=2e-3, batch_size=128, num_steps=2000,
                                 chunk_steps=500, ema_decay=0.999)
    sampler = LS.train_latent_sampler(z_train, cfg)
    ref = M.sample(gm, jax.random.PRNGKey(1), N_EVAL)[0]
    held = M.sample(gm, jax.random.PRNGKey(2), N_EVAL)[0]
    return gm, z_train, sampler, ref, held


def _distances(gm, stats, x, ref):
    """Energy distance and sliced W2 in normalised coordinates (every dimension weighs the same),
    and the mixture fit (component weights by hard assignment)."""
    xn, rn = LT.normalize(x, stats), LT.normalize(ref, stats)
    fit = metrics.mixture_fit(gm, x)
    return {"ed": float(metrics.energy_distance(xn, rn)),
            "sw": float(metrics.sliced_wasserstein(xn, rn, jax.random.PRNGKey(5), 128)),
            "weight_error": float(fit["weight_error"])}


def test_latent_sampler_fits_mixture(mixture_run):
    gm, z_train, sampler, ref, held = mixture_run
    # Chunk-mean L2 losses: from 1 (the zero-initialised net) down to well below the first chunk's.
    assert sampler.losses.shape == (4,) and sampler.losses[-1] < min(0.25, sampler.losses[0])
    held_loss = float(sampler.loss(held, jax.random.PRNGKey(6)))  # EMA params, fresh latents
    assert abs(held_loss - sampler.losses[-1]) < 0.05, (held_loss, sampler.losses)
    z = sampler.sample(jax.random.PRNGKey(3), N_EVAL)
    assert z.shape == (N_EVAL, D) and bool(jnp.all(jnp.isfinite(z)))
    # Denormalised: the sample mean is the data mean (far from 0), per dimension.
    data_mean, data_std = np.mean(z_train, 0), np.std(z_train, 0)
    assert np.sum(np.abs(data_mean) > 2 * data_std) >= 3
    np.testing.assert_array_less(np.abs(np.mean(z, 0) - data_mean), 0.15 * data_std)
    np.testing.assert_allclose(np.std(z, 0), data_std, rtol=0.15)
    zn = sampler.sample(jax.random.PRNGKey(3), N_EVAL, normalized=True)
    np.testing.assert_allclose(LT.denormalize(zn, sampler.stats), z, rtol=1e-5, atol=1e-4)

    st = sampler.stats
    model = _distances(gm, st, z, ref)
    truth = _distances(gm, st, held, ref)
    gauss = _distances(gm, st, LT.denormalize(
        jax.random.normal(jax.random.PRNGKey(4), (N_EVAL, D)), st), ref)
    untrained = LS.LatentSampler(
        params=jax.tree_util.tree_map(jnp.zeros_like, sampler.params),
        ema_params=jax.tree_util.tree_map(jnp.zeros_like, sampler.params), stats=st,
        losses=None, module=sampler.module, process=sampler.process, config=sampler.config)
    blind = _distances(gm, st, untrained.sample(jax.random.PRNGKey(3), N_EVAL), ref)
    print("\nlatent sampler ED/SW/weight error: model", model, "held-out", truth, "gaussian", gauss,
          "untrained", blind)
    # As close to the mixture as a held-out true sample (measured: ED 0.003-0.005 vs 0.004, SW
    # 0.05-0.06 vs 0.053), far closer than the moment-matched Gaussian (ED 0.106, SW 0.26, the
    # component weights off by 0.24) and the untrained net (eps = 0: x_T / alpha_T).
    assert model["ed"] < 2.5 * truth["ed"] + 2e-3, (model, truth)
    assert model["sw"] < 1.5 * truth["sw"], (model, truth)
    assert model["ed"] < 0.1 * gauss["ed"] and model["sw"] < 0.4 * gauss["sw"], (model, gauss)
    assert model["ed"] < 1e-3 * blind["ed"], (model, blind)
    assert model["weight_error"] < 0.04 and gauss["weight_error"] > 0.15


def test_latent_sampler_l1_and_no_normalisation(mixture_run):
    """DiffAE's network (LayerNorm) and L1 objective train too (short run; the energy distance, robust
    to a few tail outliers); without normalisation the same run is much worse."""
    gm, z_train, _, ref, _ = mixture_run
    common = dict(num_layers=3, hidden=64, learning_rate=2e-3, batch_size=128, num_steps=600,
                  chunk_steps=600, ema_decay=0.99)
    l1 = LS.train_latent_sampler(z_train, LS.LatentSamplerConfig(loss="l1", **common))
    raw = LS.train_latent_sampler(z_train, LS.LatentSamplerConfig(loss="l1", normalize=False,
                                                                  **common))
    np.testing.assert_allclose(raw.stats.std, 1.0)
    st = LT.fit_latent_stats(z_train)
    gauss = _distances(gm, st, LT.denormalize(
        jax.random.normal(jax.random.PRNGKey(4), (N_EVAL, D)), st), ref)
    d_l1 = _distances(gm, st, l1.sample(jax.random.PRNGKey(3), N_EVAL), ref)
    d_raw = _distances(gm, st, raw.sample(jax.random.PRNGKey(3), N_EVAL), ref)
    print("\nL1 (normalised)", d_l1, "L1 (raw z)", d_raw, "gaussian", gauss)
    assert d_l1["ed"] < 0.3 * gauss["ed"], (d_l1, gauss)
    assert d_raw["ed"] > 2 * d_l1["ed"], (d_raw, d_l1)


# ------------------------------------------------------------------------------ manipulation
def _attribute_latents(seed=0, n=3000, d=16, k=1, noise=0.3):
    rs = np.random.RandomState(seed)
    mean, std = rs.uniform(-5, 5, d), np.exp(rs.uniform(np.log(0.2), np.log(5), d))
    u = rs.standard_normal((n, d))
    w = rs.standard_normal((k, d))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    labels = (u @ w.T + noise * rs.standard_normal((n, k)) > 0).astype(np.int32)
    z = (mean + std * u).astype(np.float32)
    return z, labels, w


@pytest.mark.parametrize("method", MP.CLASSIFIERS)
def test_attribute_direction_recovers_truth(method):
    z, labels, w = _attribute_latents()
    direction = MP.attribute_direction(z, labels[:, 0], method=method)
    assert direction.shape == (16,)
    np.testing.assert_allclose(float(jnp.linalg.norm(direction)), 1.0, rtol=1e-5)
    cos = float(direction @ w[0])
    assert cos > 0.9, (method, cos)
    # K attributes at once (CelebA style (N, K) targets).
    z, labels, w = _attribute_latents(seed=1, k=3)
    dirs = MP.attribute_direction(z, labels, method=method)
    assert dirs.shape == (3, 16)
    cos = np.sum(np.asarray(dirs) * w, axis=1)
    assert np.all(cos > 0.9), (method, cos)


def test_manipulate_moves_logit_linearly():
    z, labels, _ = _attribute_latents(seed=2)
    clf = MP.fit_linear_classifier(z, labels[:, 0])
    w = clf.directions
    scales = [-1.0, -0.3, 0.0, 0.3, 1.0]
    logits = np.stack([np.asarray(clf.logits(MP.manipulate(z[:50], w, s, clf.stats)))
                       for s in scales])
    assert np.all(np.diff(logits, axis=0) > 0)  # monotone in the scale, for every latent
    # Closed form: the logit moves by exactly scale sqrt(D) ||w_raw||.
    gain = math.sqrt(16) * float(jnp.linalg.norm(clf.weights[0]))
    expected = np.broadcast_to(np.asarray(scales)[:, None] * gain, logits.shape)
    np.testing.assert_allclose(logits - logits[2], expected, rtol=1e-4, atol=1e-4)
    # Scale 0 is the identity; a per-latent scale vector works; DiffAE's 0.3 raises P(positive).
    np.testing.assert_allclose(MP.manipulate(z, w, 0.0, clf.stats), z, rtol=1e-6, atol=1e-5)
    per = MP.manipulate(z[:3], w, jnp.array([0.0, 0.3, 1.0]), clf.stats)
    np.testing.assert_allclose(per[1], MP.manipulate(z[1], w, 0.3, clf.stats), rtol=1e-6)
    before = float(jnp.mean(clf.logits(z) > 0))
    after = float(jnp.mean(clf.logits(MP.manipulate(z, w, 0.3, clf.stats)) > 0))
    assert after > before + 0.2, (before, after)


def test_manipulation_errors_and_one_vs_rest():
    z, labels, _ = _attribute_latents(seed=3, k=1)
    with pytest.raises(ValueError, match="one row per latent"):
        MP.attribute_direction(z, labels[:-1, 0])
    with pytest.raises(ValueError, match="no positive examples"):
        MP.attribute_direction(z, np.zeros(len(z), np.int32))
    with pytest.raises(ValueError, match="no negative examples"):
        MP.attribute_direction(z, np.ones(len(z), bool))
    classes = np.asarray(z[:, 0] > np.median(z[:, 0]), np.int32) + 2 * (z[:, 1] > 0)
    with pytest.raises(ValueError, match="class 4 has no positive examples"):
        MP.attribute_direction(z, classes, num_classes=5)
    assert MP.attribute_direction(z, classes).shape == (4, 16)  # one-vs-rest over 4 classes
    with pytest.raises(ValueError, match="unknown classifier"):
        MP.attribute_direction(z, labels[:, 0], method="svm")
    with pytest.raises(ValueError, match=r"direction must have shape \(16,\)"):
        MP.manipulate(z, jnp.ones((2, 16)), 0.3)
    with pytest.raises(ValueError, match="non-zero"):
        MP.manipulate(z, jnp.zeros(16), 0.3)
    with pytest.raises(ValueError, match="one per latent"):
        MP.manipulate(z[:4], jnp.ones(16), jnp.ones(3))
