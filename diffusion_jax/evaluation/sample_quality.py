"""Standard sample-quality metrics on Inception features, computed as the reference code does.

    metric     features          as                                   defaults
    fid        pool3 (2048)      pytorch-fid calculate_frechet_distance  eps 1e-6 (sqrtm fallback)
    is         logits_unbiased   torch-fidelity isc (shuffled, seed)  10 splits, seed 2020
    kid        pool3             torch-fidelity kid (unbiased MMD^2,  100 subsets of 1000,
                                 k = (x.y / D + 1)^3)                 seed 2020
    prc        pool3             torch-fidelity prc (Kynkaanniemi et  k = 3
                                 al. 2019: k-NN balls)

FID:  ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^{1/2}),  S the unbiased covariance (np.cov).
IS:   exp E_x KL(p(y|x) || p(y)) per split of the (seeded) shuffled samples; mean and std.
KID:  mean / std over random subsets of the unbiased MMD^2 (`distances.polynomial_mmd2`).
PRC:  precision = fraction of generated samples inside some real sample's ball (radius: distance
      to its k-th nearest real neighbour); recall = the same with the roles swapped.

Statistics stream: `FeatureStatistics.update` keeps float64 running sums (shifted by the first
batch's mean), so mu / sigma of any number of samples need O(D^2) memory. Reference statistics
live in `.npz` files with keys `mu` (D,) and `sigma` (D, D) (pytorch-fid / clean-fid / the
common CIFAR-10 files), optionally `features` (N, D) for KID / precision-recall.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np

from diffusion_jax.evaluation.distances import polynomial_mmd2, sqrtm_frechet_distance

__all__ = ["METRICS", "FeatureStatistics", "ReferenceStatistics", "save_statistics",
           "load_statistics", "frechet_inception_distance", "inception_score",
           "kernel_inception_distance", "precision_recall", "reference_from_batches",
           "evaluate_samples"]

METRICS = ("fid", "is", "kid", "prc")


class FeatureStatistics:
    """Streamed mean and unbiased covariance (np.cov's) of (B, D) feature batches, float64."""

    def __init__(self):
        self.n, self._shift, self._s1, self._s2 = 0, None, None, None

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (B, D), got shape {f.shape}")
        if self._shift is None:
            self._shift = f.mean(0)
            d = f.shape[1]
            self._s1, self._s2 = np.zeros(d), np.zeros((d, d))
        elif f.shape[1] != self._shift.shape[0]:
            raise ValueError(f"features of dimension {f.shape[1]} after {self._shift.shape[0]}")
        c = f - self._shift
        self._s1 += c.sum(0)
        self._s2 += c.T @ c
        self.n += len(f)

    @property
    def mu(self) -> np.ndarray:
        self._need(1)
        return self._shift + self._s1 / self.n

    @property
    def sigma(self) -> np.ndarray:
        self._need(2)
        m = self._s1 / self.n
        return (self._s2 - self.n * np.outer(m, m)) / (self.n - 1)

    def _need(self, k):
        if self.n < k:
            raise ValueError(f"statistics need at least {k} feature vectors, got {self.n}")


@dataclasses.dataclass
class ReferenceStatistics:
    """mu (D,), sigma (D, D) float64 and, for KID / precision-recall, the features (N, D)."""
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    source: str = "reference"


def save_statistics(path: str, mu, sigma, features=None) -> str:
    """Writes `mu`, `sigma` (and `features` if given) to the .npz file `path`."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    np.savez(path, **arrays)
    return path


def load_statistics(path: str) -> ReferenceStatistics:
    """Reads a statistics .npz (keys `mu`, `sigma`, optional `features`); errors name the file."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"reference statistics file {path!r} lacks "
                                 f"{sorted({'mu', 'sigma'} - keys)} (has {sorted(keys)}); "
                                 "expected the keys 'mu' and 'sigma'")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            feats = z["features"].astype(np.float32) if "features" in keys else None
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read reference statistics file {path!r}: {e}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or (feats is not None and feats.shape[1:] != (d,)):
        raise ValueError(f"reference statistics file {path!r}: mu {mu.shape}, sigma "
                         f"{sigma.shape} are not (D,), (D, D)")
    return ReferenceStatistics(mu, sigma, feats, source=path)


def frechet_inception_distance(mu_g, sigma_g, mu_r, sigma_r, eps: float = 1e-6) -> float:
    """FID exactly as pytorch-fid computes it (`distances.sqrtm_frechet_distance`)."""
    return sqrtm_frechet_distance(mu_g, sigma_g, mu_r, sigma_r, eps)


def inception_score(logits, splits: int = 10, shuffle: bool = True,
                    seed: int = 2020) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(mean_x KL(softmax(l_x) || mean softmax)), float64; the
    rows are first permuted by np.random.RandomState(seed) as torch-fidelity does. Terms with
    p = 0 count 0 (torch-fidelity's 0 * log 0 gives nan when a softmax underflows)."""
    l = np.asarray(logits, np.float64)
    if l.ndim != 2 or len(l) < splits:
        raise ValueError(f"Inception Score needs (N, C) logits with N >= splits ({splits}), got "
                         f"shape {l.shape}")
    n = len(l)
    if shuffle:
        l = l[np.random.RandomState(seed).permutation(n)]
    log_p = l - l.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        q = p[sl].mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):   # 0 log 0 = 0 (q = 0 => p = 0)
            kl = np.where(p[sl] > 0, p[sl] * (log_p[sl] - np.log(q)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(f_g, f_r, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial MMD^2 over `subsets` pairs of random subsets drawn
    without replacement by one np.random.RandomState(seed) (generated first, as torch-fidelity)."""
    f_g, f_r = np.asarray(f_g, np.float64), np.asarray(f_r, np.float64)
    if f_g.ndim != 2 or f_r.ndim != 2 or f_g.shape[1] != f_r.shape[1]:
        raise ValueError(f"KID needs (N, D) features with the same D, got {f_g.shape}, "
                         f"{f_r.shape}")
    if min(len(f_g), len(f_r)) < subset_size:
        raise ValueError(f"KID subset size (kid_subset_size) {subset_size} exceeds the number of "
                         f"generated ({len(f_g)}) or reference ({len(f_r)}) feature vectors")
    rng = np.random.RandomState(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        a = f_g[rng.choice(len(f_g), subset_size, replace=False)]
        b = f_r[rng.choice(len(f_r), subset_size, replace=False)]
        vals[i] = polynomial_mmd2(a, b, degree=degree, gamma=gamma, coef0=coef0)
    return float(vals.mean()), float(vals.std())


def _sq_dists(a, b):
    """Squared Euclidean distances (len a, len b), float32 via |a|^2 - 2 a.b + |b|^2 (as
    torch.cdist's matrix-product path), clipped at 0."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _radii(f, k, block):
    """Squared distance of each row of f to its k-th nearest other row."""
    return np.concatenate([np.partition(_sq_dists(f[i:i + block], f), k, axis=1)[:, k]
                           for i in range(0, len(f), block)])


def _covered(q, f, r2, block):
    """Fraction of rows of q within the ball (squared radius r2) of some row of f."""
    hit = [(_sq_dists(q[i:i + block], f) <= r2[None, :]).any(1) for i in range(0, len(q), block)]
    return float(np.concatenate(hit).mean())


def precision_recall(f_g, f_r, k: int = 3, block: int = 2048) -> dict[str, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019; torch-fidelity's prc) with k-NN
    balls, float32 distances in row blocks of `block`: {'precision', 'recall', 'f_score'}."""
    f_g, f_r = np.asarray(f_g, np.float32), np.asarray(f_r, np.float32)
    if min(len(f_g), len(f_r)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} generated and "
                         f"reference features, got {len(f_g)} and {len(f_r)}")
    precision = _covered(f_g, f_r, _radii(f_r, k, block), block)
    recall = _covered(f_r, f_g, _radii(f_g, k, block), block)
    return {"precision": precision, "recall": recall,
            "f_score": 2 * precision * recall / max(1e-5, precision + recall)}


def reference_from_batches(extractor, batches: Iterable, *, keep_features: bool = False,
                           total: int | None = None, source: str = "dataset"):
    """ReferenceStatistics of image batches (through `extractor.stream`)."""
    stats, feats = FeatureStatistics(), []
    for out in extractor.stream(batches, total=total):
        stats.update(out["pool3"])
        if keep_features:
            feats.append(out["pool3"])
    return ReferenceStatistics(stats.mu, stats.sigma,
                               np.concatenate(feats) if keep_features else None, source)


def evaluate_samples(extractor, batches: Iterable, reference: ReferenceStatistics | None, *,
                     metrics: Sequence[str] = METRICS, total: int | None = None,
                     is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     prc_k: int = 3, seed: int = 2020) -> dict:
    """The requested `metrics` of the generated image batches against `reference` (None: only
    'is'). Features are streamed; pool3 vectors are kept only for 'kid' / 'prc', logits for 'is'.
    Returns {'num_samples', 'fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std', 'precision',
    'recall', 'f_score'} (the requested ones)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {METRICS}")
    needs_ref = [m for m in metrics if m != "is"]
    if needs_ref and reference is None:
        raise ValueError(f"metrics {needs_ref} need reference statistics")
    needs_feats = [m for m in metrics if m in ("kid", "prc")]
    if needs_feats and reference.features is None:
        raise ValueError(f"metrics {needs_feats} need the reference features, which "
                         f"{reference.source} does not hold (a statistics file with a "
                         "'features' array, or a dataset split)")
    stats, feats, logits = FeatureStatistics(), [], []
    for out in extractor.stream(batches, total=total):
        stats.update(out["pool3"])
        if needs_feats:
            feats.append(out["pool3"])
        if "is" in metrics:
            logits.append(out["logits_unbiased"])
    result: dict = {"num_samples": stats.n}
    if "fid" in metrics:
        result["fid"] = frechet_inception_distance(stats.mu, stats.sigma, reference.mu,
                                                   reference.sigma)
    if "is" in metrics:
        result["is_mean"], result["is_std"] = inception_score(np.concatenate(logits), is_splits,
                                                              seed=seed)
    if "kid" in metrics:
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(
            np.concatenate(feats), reference.features, subsets=kid_subsets,
            subset_size=kid_subset_size, seed=seed)
    if "prc" in metrics:
        result.update(precision_recall(np.concatenate(feats), reference.features, k=prc_k))
    return result
