"""Sample-quality metrics: distances against closed forms, the classifier learns the digits."""
import numpy as np
import pytest

from diffusion_jax.evaluation import frechet_distance, kernel_distance, train_feature_classifier
from diffusion_jax.evaluation.distances import gaussian_frechet_distance


def test_frechet_distance_closed_form():
    # Commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu_a, mu_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = gaussian_frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    # Non-commuting: rotate one covariance; compare with the 2x2 closed form via scipy.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = m1 @ m1.T, m2 @ m2.T
    ref = np.trace(c1 + c2 - 2 * np.real(scipy_linalg.sqrtm(c1 @ c2)))
    assert gaussian_frechet_distance(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(ref, rel=1e-8)


def test_sample_distances_separate_distributions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8))
    y = rng.normal(size=(2000, 8))
    z = rng.normal(size=(2000, 8)) * 1.5 + 0.5
    assert frechet_distance(x, y) < 0.05
    assert frechet_distance(x, z) == pytest.approx(8 * 0.25 + 8 * 0.5 ** 2, rel=0.1)
    kxy, _ = kernel_distance(x, y, num_subsets=20)
    kxz, _ = kernel_distance(x, z, num_subsets=20)
    assert abs(kxy) < 0.02 and kxz > 0.5
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, z[:, :4])


def test_classifier_learns_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images[..., None] / 8.0 - 1.0).astype(np.float32)      # 8x8 in [-1, 1]
    y = d.target
    net = train_feature_classifier(x[:1400], y[:1400], steps=600, batch_size=64, ch=16)
    assert net.train_accuracy > 0.97
    assert net.accuracy(x[1400:], y[1400:]) > 0.9
    f = net.features(x[:10])
    assert f.shape == (10, 128) and np.isfinite(f).all()
