"""Readouts: vmapped features vs a hand-written loop, probes vs closed forms / sklearn, k-NN by hand,
and a sweep that must find the one informative (t, block) cell of a hand-built module."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import readouts as R
from diffusion_jax.networks import DiT, FeatureInfo, UNet, block_names, init_params
from diffusion_jax.processes import VPLinear
from diffusion_jax.reports.plots import probe_heatmap

PROC = VPLinear()
TS = np.array([0.01, 0.2, 0.7], np.float32)
BLOCKS = ("down_0_0", "mid", "up_1_0", "up_0_1")
KEY = jax.random.PRNGKey(7)


def _init(module, shape, cond=None):
    """init_params with an RBG key: the same network, several times faster to compile on CPU."""
    return init_params(module, jax.random.key(0, impl="unsafe_rbg"), shape, cond)


@pytest.fixture(scope="module")
def unet():
    """A tiny UNet with z conditioning, i.e. a diffusion-autoencoder decoder (cond={'z': z})."""
    module = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                  z_conditioning=("adagn_scale",))
    z = jax.random.normal(jax.random.PRNGKey(4), (5, 6))
    params = _init(module, (5, 8, 8, 3), {"z": z})

    # move off the zero init of every ResBlock's conv2 (else z never reaches a sown feature)
    leaves, tree = jax.tree_util.tree_flatten(params)
    params = jax.tree_util.tree_unflatten(tree, [
        a + 0.05 * np.sin(1.7 * np.arange(a.size) + i).reshape(a.shape).astype(np.float32)
        for i, a in enumerate(leaves)])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
    return module, params, x, {"z": z}


def _manual(module, params, x, t, eps, cond):
    """Independent reference: x_t = alpha x + sigma eps, one apply, the raw sown maps."""
    xt = PROC.alpha(t) * x + PROC.sigma(t) * eps
    _, st = module.apply({"params": params}, xt, jnp.full((x.shape[0],), t), cond,
                         mutable=["intermediates"])
    return {k: v[0] for k, v in st["intermediates"].items()}


# ----------------------------------------------------------------------------------- features
def test_vmapped_grid_equals_per_t_loop(unet):
    module, params, x, cond = unet
    f = R.features(module, params, x, TS, BLOCKS, process=PROC, key=KEY, cond=cond)
    eps = R.draw_noise(KEY, x.shape, len(TS))
    assert eps.shape == (len(TS),) + x.shape
    assert not np.allclose(eps[0], eps[1])                     # fresh noise per t
    manual = jax.jit(lambda p, x, t, e, c: _manual(module, p, x, t, e, c))
    for i, t in enumerate(TS):
        ref = manual(params, x, t, eps[i], cond)
        one = R.features(module, params, x, TS[i:i + 1], BLOCKS, process=PROC, noise=eps[i],
                         cond=cond)
        for b in BLOCKS:
            c = block_names(module, x.shape)[b].shape[-1]
            assert f[b].shape == (len(TS), x.shape[0], c) and f[b].dtype == jnp.float32
            # pooled = mean of the raw sown map over (H, W)
            np.testing.assert_allclose(f[b][i], np.asarray(ref[b]).mean((1, 2)), rtol=1e-5,
                                       atol=1e-6, err_msg=b)
            np.testing.assert_allclose(one[b][0], f[b][i], rtol=1e-5, atol=1e-6, err_msg=b)
    # low noise keeps the noise-free features (same t), high noise does not
    err = [np.abs(f["mid"][i] - np.asarray(manual(params, x, t, jnp.zeros_like(x), cond)["mid"])
                  .mean((1, 2))).mean() for i, t in enumerate(TS)]
    assert err[0] < 0.2 * err[2], err
    # the latent reaches the decoder's features
    g = R.features(module, params, x, TS, BLOCKS, process=PROC, key=KEY, cond={"z": -cond["z"]})
    assert np.abs(np.asarray(g["up_0_1"]) - np.asarray(f["up_0_1"])).mean() > 1e-3


def test_fixed_noise_is_deterministic_and_shared(unet):
    module, params, x, cond = unet
    kw = dict(process=PROC, cond=cond)
    noise = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    a = R.features(module, params, x, TS, BLOCKS, noise=noise, **kw)["mid"]
    b = R.features(module, params, x, TS, BLOCKS, noise=noise, **kw)["mid"]
    np.testing.assert_array_equal(a, b)
    per_t = R.features(module, params, x, TS, BLOCKS,
                       noise=jnp.broadcast_to(noise, (len(TS),) + x.shape), **kw)["mid"]
    np.testing.assert_allclose(a, per_t, rtol=1e-6, atol=1e-7)
    shared = R.draw_noise(KEY, x.shape, len(TS), share=True)
    np.testing.assert_array_equal(shared[0], shared[2])
    k1 = R.features(module, params, x, TS, BLOCKS, key=KEY, **kw)["mid"]
    k2 = R.features(module, params, x, TS, BLOCKS, key=jax.random.PRNGKey(8), **kw)["mid"]
    assert np.abs(np.asarray(k1) - np.asarray(k2))[1:].mean() > 1e-3   # the key matters


def test_extract_features_matches_features_at_any_batch_size(unet):
    module, params, x, cond = unet
    full = R.features(module, params, x, TS, BLOCKS, process=PROC, key=KEY, cond=cond)
    # 5 examples in batches of 2: the last batch is padded; cond is batched alongside
    out = R.extract_features(module, params, np.asarray(x), TS, ["up_1_0", "mid"], process=PROC,
                             batch_size=2, key=KEY, cond={"z": np.asarray(cond["z"])})
    for b in ("up_1_0", "mid"):
        assert isinstance(out[b], np.ndarray) and out[b].shape == full[b].shape
        np.testing.assert_allclose(out[b], full[b], rtol=1e-5, atol=1e-6)


def test_dit_pools_over_tokens():
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 8, 8, 3))
    noise = jax.random.normal(jax.random.PRNGKey(6), x.shape)
    dit = DiT(patch_size=4, hidden_size=32, depth=2, num_heads=2, dropout=0.0)
    pd = _init(dit, (3, 8, 8, 3))
    fd = R.features(dit, pd, x, [0.05, 0.5], ["block_1"], process=PROC, noise=noise, pool="none")
    gd = R.features(dit, pd, x, [0.05, 0.5], ["block_1"], process=PROC, noise=noise)
    assert fd["block_1"].shape == (2, 3, 4, 32)
    np.testing.assert_allclose(gd["block_1"], np.asarray(fd["block_1"]).mean(2), rtol=1e-5,
                               atol=1e-6)
    ref = jax.jit(lambda p: _manual(dit, p, x, 0.5, noise, None)["block_1"])(pd)
    np.testing.assert_allclose(fd["block_1"][1], ref, rtol=1e-5, atol=1e-5)


def test_max_and_mean_max_pools_equal_the_raw_map_pooled(unet):
    """'gmp' is the max of the raw map over (H, W); 'gap_gmp' concatenates [mean, max] (2C)."""
    module, params, x, cond = unet
    noise = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    kw = dict(process=PROC, noise=noise, cond=cond)
    raw = {b: np.asarray(v) for b, v in R.features(module, params, x, TS, BLOCKS, pool="none",
                                                   **kw).items()}
    mx = R.features(module, params, x, TS, BLOCKS, pool="gmp", **kw)
    both = R.features(module, params, x, TS, BLOCKS, pool="gap_gmp", **kw)
    for b in BLOCKS:
        c = raw[b].shape[-1]
        np.testing.assert_allclose(mx[b], raw[b].max((2, 3)), rtol=1e-6, atol=1e-6, err_msg=b)
        assert both[b].shape == raw[b].shape[:2] + (2 * c,)
        np.testing.assert_allclose(both[b][..., :c], raw[b].mean((2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both[b][..., c:], raw[b].max((2, 3)), rtol=1e-6, atol=1e-6)
        assert np.abs(raw[b].max((2, 3)) - raw[b].mean((2, 3))).mean() > 1e-3   # not the same


def test_feature_errors(unet):
    module, params, x, _ = unet
    with pytest.raises(ValueError, match=r"unknown block.*'nope'.*valid blocks.*up_1_0"):
        R.features(module, params, x, TS, ["mid", "nope"], process=PROC, key=KEY)
    with pytest.raises(ValueError, match="timesteps outside the time range"):
        R.features(module, params, x, [0.0, 0.5], ["mid"], process=PROC, key=KEY)
    with pytest.raises(ValueError, match="timesteps outside the time range"):
        R.extract_features(module, params, np.asarray(x), [1.5], ["mid"], process=PROC,
                           batch_size=2, key=KEY)
    with pytest.raises(ValueError, match="key="):
        R.features(module, params, x, TS, ["mid"], process=PROC)
    with pytest.raises(ValueError, match="noise has shape"):
        R.features(module, params, x, TS, ["mid"], process=PROC, noise=jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="unknown pool"):
        R.features(module, params, x, TS, ["mid"], process=PROC, key=KEY, pool="max")
    with pytest.raises(ValueError, match="uint8"):
        R.extract_features(module, params, np.zeros((4, 8, 8, 3), np.uint8), TS, ["mid"],
                           process=PROC, batch_size=2, key=KEY)
    with pytest.raises(ValueError, match="cond"):
        R.extract_features(module, params, np.asarray(x), TS, ["mid"], process=PROC, batch_size=2,
                           key=KEY, cond={"z": np.zeros((3, 4))})


# ------------------------------------------------------------------------------------- probes
def _blobs(n, d, k, sep, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_probe_separable_random_and_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    # separable with a wide margin: 100% train and test
    x, y = _blobs(700, 8, 4, 4.0, 0)
    probe = R.fit_linear_probe(x[:300], y[:300])
    assert probe.accuracy(x[:300], y[:300]) == 1.0 and probe.accuracy(x[300:], y[300:]) == 1.0
    assert probe.val_accuracy == 1.0 and probe.grid_accuracy.shape == (3, 3)
    assert probe.lr in probe.lrs and probe.weight_decay in probe.weight_decays
    assert probe.num_classes == 4
    # random labels: chance on the test set
    rng = np.random.default_rng(1)
    yr = rng.integers(0, 4, 700)
    r = R.probe_accuracy(x[:300], yr[:300], x[300:], yr[300:])
    assert abs(r["test_accuracy"] - 0.25) < 0.07, r
    assert abs(r["val_accuracy"] - 0.25) < 0.08, r
    # overlapping classes: agrees with sklearn's LogisticRegression
    x, y = _blobs(3000, 10, 4, 0.6, 2)
    ours = R.probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], epochs=30)
    sc = StandardScaler().fit(x[:1000])
    sk = LogisticRegression(max_iter=5000).fit(sc.transform(x[:1000]), y[:1000])
    sk_acc = sk.score(sc.transform(x[1000:]), y[1000:])
    assert 0.5 < sk_acc < 0.9                                   # non-trivial
    assert abs(ours["test_accuracy"] - sk_acc) < 0.02, (ours, sk_acc)
    # held-out selection and full-batch training also work
    hold = R.fit_linear_probe(x[:1000], y[:1000], val_fraction=0.25, batch_size=None, epochs=200,
                              lrs=(0.05,), weight_decays=(0.0,))
    assert abs(hold.accuracy(x[1000:], y[1000:]) - sk_acc) < 0.02


def test_probe_errors():
    x, y = _blobs(50, 4, 3, 3.0, 0)
    with pytest.raises(ValueError, match="length mismatch"):
        R.fit_linear_probe(x, y[:-1])
    with pytest.raises(ValueError, match="length mismatch"):
        R.probe_accuracy(x, y, x, y[:10])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        R.fit_linear_probe(x, y, num_classes=2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        R.fit_linear_probe(x[:, 0], y)
    with pytest.raises(ValueError, match="val_fraction"):
        R.fit_linear_probe(x, y, val_fraction=1.5)
    with pytest.raises(ValueError, match="length mismatch"):
        R.fit_linear_regression(x, y[:3])


def test_ridge_matches_closed_form_and_sklearn():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score as sk_r2
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) * rng.uniform(0.5, 3.0, 8) + 2.0
    w = rng.normal(size=(8, 2))
    y = x @ w + 0.5 * rng.normal(size=(300, 2))
    m = R.fit_linear_regression(x[:200], y[:200])
    assert m.alpha in m.alphas and m.grid_r2.shape == (7,)
    sc = StandardScaler().fit(x[:200])
    sk = Ridge(alpha=m.alpha).fit(sc.transform(x[:200]), y[:200])
    np.testing.assert_allclose(m.predict(x[200:]), sk.predict(sc.transform(x[200:])), atol=1e-9)
    # closed form on the standardised design: (X'^T X' + a I)^{-1} X'^T (y - mean y)
    xs = sc.transform(x[:200])
    w_cf = np.linalg.solve(xs.T @ xs + m.alpha * np.eye(8), xs.T @ (y[:200] - y[:200].mean(0)))
    np.testing.assert_allclose(m.weight, w_cf, rtol=1e-9, atol=1e-10)
    pred = m.predict(x[200:])
    assert R.r2_score(y[200:], pred) == pytest.approx(sk_r2(y[200:], pred), abs=1e-12)
    assert m.r2(x[200:], y[200:]) > 0.95
    # a (N,) target gives (N,) predictions; a pure-noise target has R^2 ~ 0 out of sample
    m1 = R.fit_linear_regression(x[:200], y[:200, 0], folds=4)
    assert m1.predict(x[200:]).shape == (100,)
    noise = R.fit_linear_regression(x[:200], rng.normal(size=200), val_fraction=0.3)
    assert noise.r2(x[200:], rng.normal(size=100)) < 0.1
    assert R.r2_score([1.0, 1.0], [1.0, 1.0]) == 1.0 == sk_r2([1.0, 1.0], [1.0, 1.0])


# --------------------------------------------------------------------------------------- k-NN
def test_knn_hand_checked_and_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    # query at angle 0: one class-1 neighbour at 0.1 rad, two class-0 at +-0.5 rad, class 2 far.
    ang = np.array([0.1, 0.5, -0.5, 2.5])
    tx = np.stack([np.cos(ang), np.sin(ang)], 1) * np.array([[1.0], [3.0], [0.5], [2.0]])
    ty = np.array([1, 0, 0, 2])
    q = np.array([[2.0, 0.0]])
    # majority: 2 votes class 0 vs 1; T = 0.07: exp((cos .1 - cos .5) / .07) = 5.35 > 2 -> class 1
    assert R.knn_accuracy(tx, ty, q, [0], k=3, temperature=None) == 1.0
    assert R.knn_accuracy(tx, ty, q, [1], k=3, temperature=0.07) == 1.0
    assert R.knn_accuracy(tx, ty, q, [0], k=3, temperature=1.0) == 1.0    # ratio 1.12 < 2
    assert R.knn_accuracy(tx, ty, q, [1], k=1) == 1.0

    x, y = _blobs(600, 6, 5, 6.0, 3)
    assert R.knn_accuracy(x[:400], y[:400], x[400:], y[400:]) == 1.0
    x, y = _blobs(500, 6, 3, 0.7, 4)
    for k in (1, 5, 20):
        ours = R.knn_predict(x[:300], y[:300], x[300:], k=k, metric="euclidean", temperature=None,
                             chunk_size=37)
        sk = KNeighborsClassifier(k).fit(x[:300], y[:300]).predict(x[300:])
        np.testing.assert_array_equal(ours, sk)
    a = R.knn_predict(x[:300], y[:300], x[300:], chunk_size=7)
    np.testing.assert_array_equal(a, R.knn_predict(x[:300], y[:300], x[300:], chunk_size=256))
    with pytest.raises(ValueError, match="length mismatch"):
        R.knn_accuracy(x[:300], y[:299], x[300:], y[300:])
    with pytest.raises(ValueError, match="unknown metric"):
        R.knn_accuracy(x[:300], y[:300], x[300:], y[300:], metric="manhattan")


# -------------------------------------------------------------------------------------- sweep
class _Toy(nn.Module):
    """'signal' sees x_t (its pooled value carries the image's mean level, i.e. the label);
    'junk' depends on t only."""

    def feature_info(self, input_shape):
        h, w = input_shape[-3], input_shape[-2]
        return {"junk": FeatureInfo((h, w, 4), 1), "signal": FeatureInfo((h, w, 4), 1)}

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        junk = nn.Dense(4)(jnp.broadcast_to(t[:, None, None, None], x.shape[:3] + (1,)))
        self.sow("intermediates", "junk", junk)
        self.sow("intermediates", "signal", nn.Dense(4)(x))
        return x


def test_sweep_finds_the_informative_cell(tmp_path):
    module = _Toy()
    params = _init(module, (2, 8, 8, 3))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 360)
    # the label is the image's colour: channel y raised by 0.8, plus pixel noise
    images = 0.8 * np.eye(3)[y][:, None, None, :] + 0.3 * rng.normal(size=(360, 8, 8, 3))
    images = images.astype(np.float32)
    ts = [0.01, 0.5, 1.0]
    res = R.probe_sweep(module, params, images[:240], y[:240], images[240:], y[240:],
                        process=PROC, timesteps=ts, key=KEY, batch_size=32,
                        probe_kwargs=dict(lrs=(1e-2, 1e-1), weight_decays=(0.0,)))
    assert res.blocks == ("junk", "signal")
    for m in ("linear", "knn"):
        g = res.grid(m)
        assert g.shape == (3, 2)
        best = res.best(m)
        assert (best["t"], best["block"]) == (0.01, "signal"), (m, g)
        assert best["accuracy"] > 0.95, g
        assert g[:, 0].max() < 0.55 and g[2, 1] < 0.6, (m, g)       # junk, and signal at t_max
    assert res.best("linear", on="val")["block"] == "signal"
    back = R.SweepResult.from_json(res.to_json())
    np.testing.assert_allclose(back.grid("knn"), res.grid("knn"))
    assert back.best("linear") == res.best("linear") == res.to_dict()["best"]["linear"]

    png = probe_heatmap(res, path=str(tmp_path / "sweep.png"))
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    png2 = probe_heatmap(res.grid("knn"), ts, res.blocks, str(tmp_path / "grid.png"), title="knn")
    assert open(png2, "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected"):
        probe_heatmap(res.grid("knn"), ts[:2], res.blocks, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="length mismatch"):
        R.probe_sweep(module, params, images[:10], y[:9], images[:5], y[:5], process=PROC,
                      timesteps=ts, key=KEY)
    with pytest.raises(ValueError, match="unknown block"):
        R.probe_sweep(module, params, images[:10], y[:10], images[:5], y[:5], process=PROC,
                      timesteps=ts, blocks=["mid"], key=KEY)
    with pytest.raises(ValueError, match="unknown method"):
        R.probe_sweep(module, params, images[:10], y[:10], images[:5], y[:5], process=PROC,
                      timesteps=ts, key=KEY, methods=("svm",))
