"""FID Inception-v3 in Flax against pytorch-fid (random weights written as the published .pth),
and FID / IS / KID / precision-recall against pytorch-fid's and torch-fidelity's functions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_jax.evaluation import inception as inc
from diffusion_jax.evaluation import sample_quality as sq
from diffusion_jax.weights.diffusers import WeightsError

from _fid_common import write_random_weights  # noqa: E402
from pytorch_fid import inception as pfi  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / inc.FID_WEIGHTS_FILE
    sd = write_random_weights(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    orig = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    try:
        ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        pfi.load_state_dict_from_url = orig
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        pool3 = ref(x)[0][:, :, 0, 0].numpy()
    ex = inc.InceptionFeatureExtractor.from_file(str(path), batch_size=4, progress=False)
    return dict(path=str(path), sd=sd, images=images, pool3=pool3, extractor=ex,
                out=ex.extract(images))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_pool3_and_logits_match_pytorch_fid(setup):
    got, want = setup["out"], setup["pool3"]
    # float32 through 94 conv layers: torch's own float32 result is 1.3e-4 (norm) from float64.
    assert got["pool3"].shape == (3, 2048)
    assert _rel(got["pool3"], want) < 1e-4
    np.testing.assert_allclose(got["pool3"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    w = setup["sd"]["fc.weight"].numpy()
    assert _rel(got["logits_unbiased"], want @ w.T) < 1e-4


def test_logits_match_torch_fidelity(setup):
    """torch-fidelity's extractor reads the same .pth; on 299x299 uint8 input it normalises with
    (x - 128) / 128; its 'logits_unbiased' (IS) and 'logits' equal the Flax network's."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                     feature_extractor_weights_path=setup["path"])
    u8 = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    with torch.no_grad():
        f, lu, lo = (t.numpy() for t in fe(torch.from_numpy(u8).permute(0, 3, 1, 2)))
    ex = setup["extractor"]
    out = inc.FIDInceptionV3().apply(ex.variables, (u8.astype(np.float32) - 128) / 128)
    assert _rel(np.asarray(out["pool3"]), f) < 1e-4
    assert _rel(np.asarray(out["logits_unbiased"]), lu) < 1e-4
    assert _rel(np.asarray(out["logits"]), lo) < 1e-4


@pytest.mark.parametrize("shape", [(32, 32), (512, 400)], ids=["up", "down"])
def test_resize_is_pytorch_bilinear(shape):
    import jax.numpy as jnp
    x = np.random.default_rng(2).random((2, *shape, 3), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(inc.preprocess(jnp.asarray(x), "reference"))
    np.testing.assert_allclose(got, 2 * want - 1, atol=1e-6)


def test_clean_resize_and_mesh(setup):
    """clean-fid's PIL float bicubic resize: constant images stay constant, values clipped;
    the sharded extractor (2 devices on 'data') gives the unsharded features."""
    import jax
    from jax.sharding import Mesh
    flat = np.full((1, 20, 24, 1), 77, np.uint8)
    np.testing.assert_allclose(inc.clean_resize(flat), 77 / 255, atol=1e-6)
    edge = np.zeros((1, 16, 16, 3), np.uint8)
    edge[:, :, 8:] = 255
    r = inc.clean_resize(edge)
    assert r.shape == (1, 299, 299, 3) and r.min() == 0.0 and r.max() == 1.0   # overshoot clipped
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    ex = inc.InceptionFeatureExtractor(setup["extractor"].variables, batch_size=4, mesh=mesh,
                                       progress=False)
    got = ex.extract(setup["images"])
    np.testing.assert_allclose(got["pool3"], setup["out"]["pool3"], rtol=1e-5, atol=1e-6)


def test_weights_errors(setup, tmp_path):
    with pytest.raises(WeightsError, match=r"not given: set config\.quality\.inception_weights.*"
                                           r"github\.com/mseitzer/pytorch-fid/releases"):
        inc.load_inception_variables(None)
    with pytest.raises(WeightsError, match=r"nope\.pth' does not exist.*inception_weights"):
        inc.load_inception_variables(str(tmp_path / "nope.pth"))
    sd = {k: v.numpy() for k, v in setup["sd"].items()}
    with pytest.raises(WeightsError, match="AuxLogits.fc.weight"):
        inc.convert_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((1008, 768))})
    with pytest.raises(WeightsError, match="Mixed_6a.branch3x3.conv.weight.*shape"):
        inc.convert_state_dict({**sd, "Mixed_6a.branch3x3.conv.weight": np.zeros((384, 288, 1, 1))})
    sd.pop("Mixed_7c.branch_pool.bn.running_var")
    with pytest.raises(WeightsError, match="1 FID Inception-v3 tensors are missing.*Mixed_7c/"
                                           "branch_pool/bn/var"):
        inc.convert_state_dict(sd)


# ------------------------------------------------------------------------------------ metrics
def _features(n, d=64, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ a + shift).astype(np.float32)


def test_fid_and_streamed_statistics():
    from pytorch_fid.fid_score import calculate_frechet_distance
    g, r = _features(500, seed=1), _features(700, shift=0.3, seed=2)
    st = sq.FeatureStatistics()
    for i in range(0, 500, 64):
        st.update(g[i:i + 64])
    np.testing.assert_allclose(st.mu, g.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(g.astype(np.float64), rowvar=False), rtol=1e-10,
                               atol=1e-12)
    mr, sr = r.mean(0), np.cov(r, rowvar=False)
    want = calculate_frechet_distance(st.mu, st.sigma, mr, sr)
    assert sq.frechet_inception_distance(st.mu, st.sigma, mr, sr) == pytest.approx(want, rel=1e-9)
    # singular product (D > N): the eps fallback
    g2, r2 = _features(20, d=64, seed=3), _features(20, d=64, seed=4)
    a = (g2.mean(0), np.cov(g2, rowvar=False), r2.mean(0), np.cov(r2, rowvar=False))
    assert sq.frechet_inception_distance(*a) == pytest.approx(calculate_frechet_distance(*a),
                                                              rel=1e-6)


def test_is_kid_prc_match_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    logits = _features(230, d=40, seed=5) * 3
    want = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True,
                                  rng_seed=2020)
    m, s = sq.inception_score(logits, 10, seed=2020)
    assert m == pytest.approx(want["inception_score_mean"], rel=1e-6)
    assert s == pytest.approx(want["inception_score_std"], rel=1e-6)

    g, r = _features(300, seed=6), _features(250, shift=0.2, seed=7)
    tg, tr = torch.from_numpy(g), torch.from_numpy(r)
    want = kid_features_to_metric(tg, tr, kid_subsets=20, kid_subset_size=120, verbose=False)
    m, s = sq.kernel_inception_distance(g, r, subsets=20, subset_size=120)
    assert m == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-3)
    assert s == pytest.approx(want["kernel_inception_distance_std"], rel=1e-3)

    want = prc_features_to_metric(tg, tr, prc_neighborhood=3, verbose=False)
    got = sq.precision_recall(g, r, k=3, block=128)
    for key in ("precision", "recall", "f_score"):
        assert got[key] == pytest.approx(want[key], rel=1e-3), key
    assert 0.1 < got["precision"] < 0.99


def test_statistics_npz_round_trip(tmp_path):
    g = _features(50, d=8)
    p = sq.save_statistics(str(tmp_path / "sub" / "ref.npz"), g.mean(0), np.cov(g, rowvar=False),
                           features=g)
    ref = sq.load_statistics(p)
    np.testing.assert_array_equal(ref.features, g)
    np.testing.assert_array_equal(ref.sigma, np.cov(g, rowvar=False))
    np.savez(tmp_path / "pytorch_fid_style.npz", mu=ref.mu, sigma=ref.sigma)   # users' files
    ref2 = sq.load_statistics(str(tmp_path / "pytorch_fid_style.npz"))
    assert ref2.features is None and np.array_equal(ref2.mu, ref.mu)
    np.savez(tmp_path / "bad.npz", mean=ref.mu)
    with pytest.raises(ValueError, match=r"bad\.npz.*lacks \['mu', 'sigma'\]"):
        sq.load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="kid.*pytorch_fid_style.npz"):
        sq.evaluate_samples(None, [], ref2, metrics=("fid", "kid"))


def test_evaluate_samples_end_to_end(setup, monkeypatch):
    """8 images through the extractor: the metrics equal the functions on the extracted arrays
    (FID's inputs are checked; its 2048-d sqrtm, ~20 s here, is tested above at D = 64)."""
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ex = setup["extractor"]
    ref = sq.reference_from_batches(ex, [setup["images"], imgs[:4]], keep_features=True)
    seen = {}
    monkeypatch.setattr(sq, "frechet_inception_distance",
                        lambda *a: seen.setdefault("args", a) and 1.5)
    res = sq.evaluate_samples(ex, [imgs[:4], imgs[4:]], ref, metrics=sq.METRICS, is_splits=2,
                              kid_subsets=3, kid_subset_size=5, prc_k=2)
    feats = ex.extract(imgs)
    g = feats["pool3"].astype(np.float64)
    rf = np.concatenate([setup["out"]["pool3"], feats["pool3"][:4]]).astype(np.float64)
    assert res["num_samples"] == 8 and res["fid"] == 1.5
    for got, want in zip(seen["args"], (g.mean(0), np.cov(g, rowvar=False), rf.mean(0),
                                        np.cov(rf, rowvar=False))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(ref.features, rf.astype(np.float32))
    assert res["is_mean"] == pytest.approx(sq.inception_score(feats["logits_unbiased"], 2)[0],
                                           rel=1e-6)
    assert res["kid_mean"] == pytest.approx(sq.kernel_inception_distance(
        feats["pool3"], rf, subsets=3, subset_size=5)[0], rel=1e-6)
    assert res["recall"] == sq.precision_recall(feats["pool3"], rf, k=2)["recall"]
