"""Linear probes on frozen features: multinomial logistic regression and ridge regression.

Logistic probe (DDAE / DMZ evaluation). Features are standardised with the training split's
statistics, x' = (x - mean) / std, and the probe minimises

    L(W, b) = mean_i CE(softmax(x'_i W + b), y_i)

by AdamW (decoupled decay on W only):  W <- W - lr_k (adam(grad) + wd W),
lr_k = lr (1 + cos(pi k / K)) / 2  over K = epochs * ceil(n_train / batch_size) steps, from W = 0.
Every (lr, weight decay) of the grid and every cross-validation fold trains at once (vmap over
folds x grid inside one `lax.scan`, the mini-batches shared by the grid); the pair with the best
pooled validation accuracy (ties: lower validation cross-entropy) is refitted on all training data.

Ridge probe for continuous factors: with x' standardised and y centred,

    W(alpha) = (X'^T X' + alpha I)^{-1} X'^T (y - mean y) = V diag(1 / (s + alpha)) V^T X'^T (y - mean y)

for X'^T X' = V diag(s) V^T (one eigendecomposition per fold serves every alpha; float64 numpy),
intercept mean y (unpenalised); alpha chosen by validation R^2.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ------------------------------------------------------------------------------------- checks
def _check_xy(x, y, what: str = "train", *, regression: bool = False):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"x_{what} must be (N, D) features, got shape {x.shape}")
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"label/feature length mismatch: x_{what} has {x.shape[0]} rows, "
                         f"y_{what} has {y.shape[0] if y.ndim else 'no'} entries")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"x_{what} has non-finite values")
    if regression:
        if y.ndim not in (1, 2):
            raise ValueError(f"y_{what} must be (N,) or (N, P), got shape {y.shape}")
        if not np.all(np.isfinite(y)):
            raise ValueError(f"y_{what} has non-finite values")
        return x.astype(np.float64), y.astype(np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_{what} must be (N,) integer labels, got shape {y.shape}")
    if y.size and not np.all(np.asarray(y, np.float64) == np.round(np.asarray(y, np.float64))):
        raise ValueError(f"y_{what} must hold integer class labels")
    return x.astype(np.float32), y.astype(np.int32)


def _standardizer(x: np.ndarray):
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)  # constant -> centred 0
    return mean, std


def _stratified_folds(y: np.ndarray, folds: int, rng) -> np.ndarray:
    """Fold id per example: each class shuffled and dealt round-robin, continuing across classes."""
    fold = np.empty(y.shape[0], np.int64)
    start = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (start + np.arange(idx.size)) % folds
        start += idx.size
    return fold


def _split_masks(y: np.ndarray, folds: Optional[int], val_fraction: Optional[float], rng,
                 stratify: bool = True) -> np.ndarray:
    """Validation masks (F, N): k folds, or one held-out split of size val_fraction."""
    n = y.shape[0]
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        mask = np.zeros(n, bool)
        groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(n)]
        for idx in groups:
            idx = rng.permutation(idx)
            mask[idx[: int(round(val_fraction * idx.size))]] = True
        if not 0 < mask.sum() < n:
            raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {n} examples")
        return mask[None]
    if folds is None or folds < 2:
        raise ValueError(f"need folds >= 2 or a val_fraction, got folds={folds}")
    if n < folds:
        raise ValueError(f"{n} examples cannot make {folds} folds")
    fold = _stratified_folds(y, folds, rng) if stratify else rng.permutation(n) % folds
    return fold[None] == np.arange(folds)[:, None]


# ---------------------------------------------------------------------------- logistic probe
@dataclasses.dataclass
class LinearProbe:
    """Logistic probe: logits = ((x - mean) / std) @ weight + bias."""
    weight: np.ndarray          # (D, K) on standardised features
    bias: np.ndarray            # (K,)
    mean: np.ndarray            # (D,) training-split standardisation
    std: np.ndarray             # (D,)
    lr: float                   # chosen hyper-parameters
    weight_decay: float
    val_accuracy: float         # pooled validation (CV) accuracy of the chosen pair
    grid_accuracy: np.ndarray   # (len(lrs), len(weight_decays)) validation accuracy
    lrs: tuple
    weight_decays: tuple

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x must be (N, {self.weight.shape[0]}), got shape {x.shape}")
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.logits(x), axis=-1)

    def accuracy(self, x, y) -> float:
        x, y = _check_xy(x, y, "eval")
        return float(np.mean(self.predict(x) == y))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _train(x, y, mean, std, idx, wts, lrs, wds, *, num_classes: int):
    """AdamW + cosine on every fold (F) x grid point (G): idx, wts (S, F, bs) -> W (F, G, D, K)."""
    num_steps = idx.shape[0]
    folds, dim = mean.shape
    grid = lrs.shape[0]
    adam = optax.scale_by_adam()
    cosine = optax.cosine_decay_schedule(1.0, num_steps)

    def loss_fn(p, xb, yb, wb):
        ce = optax.softmax_cross_entropy_with_integer_labels(xb @ p["W"] + p["b"], yb)
        return jnp.sum(wb * ce) / jnp.maximum(jnp.sum(wb), 1.0)

    def update(p, opt, xb, yb, wb, lr, wd, k):
        g = jax.grad(loss_fn)(p, xb, yb, wb)
        u, opt = adam.update(g, opt)
        lr_k = lr * cosine(k)
        p = {"W": p["W"] - lr_k * (u["W"] + wd * p["W"]), "b": p["b"] - lr_k * u["b"]}
        return p, opt

    over_grid = jax.vmap(update, in_axes=(0, 0, None, None, None, 0, 0, None))
    over_folds = jax.vmap(over_grid, in_axes=(0, 0, 0, 0, 0, None, None, None))

    def step(carry, inp):
        p, opt = carry
        i, w, k = inp
        xb = (x[i] - mean[:, None]) / std[:, None]                 # (F, bs, D)
        return over_folds(p, opt, xb, y[i], w, lrs, wds, k), None

    p0 = {"W": jnp.zeros((folds, grid, dim, num_classes), jnp.float32),
          "b": jnp.zeros((folds, grid, num_classes), jnp.float32)}
    opt0 = jax.vmap(jax.vmap(adam.init))(p0)
    (p, _), _ = jax.lax.scan(step, (p0, opt0), (idx, wts, jnp.arange(num_steps)))
    return p


@jax.jit
def _evaluate(p, x, y, mean, std, mask):
    """Validation (correct count, summed CE) per fold x grid point: (F, G) each."""

    def fold(args):
        w, b, mu, sd, m = args
        xs = (x - mu) / sd

        def one(w, b):
            logits = xs @ w + b
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(m * (jnp.argmax(logits, -1) == y)), jnp.sum(m * ce)

        return jax.vmap(one)(w, b)

    return jax.lax.map(fold, (p["W"], p["b"], mean, std, mask.astype(jnp.float32)))


def _batches(train_masks: np.ndarray, epochs: int, batch_size: Optional[int], rng):
    """Per-step indices and weights (S, F, bs): each fold's training set reshuffled every epoch,
    padded (weight 0) to whole batches; one full batch per epoch if batch_size is None or larger."""
    sets = [np.flatnonzero(m) for m in train_masks]
    m = max(s.size for s in sets)
    bs = m if batch_size is None else min(batch_size, m)
    steps = -(-m // bs)
    idx = np.zeros((epochs, len(sets), steps * bs), np.int32)
    wts = np.zeros(idx.shape, np.float32)
    for e in range(epochs):
        for f, s in enumerate(sets):
            idx[e, f, : s.size] = s if bs == m else rng.permutation(s)
            wts[e, f, : s.size] = 1.0
    shape = (epochs, len(sets), steps, bs)
    idx = idx.reshape(shape).transpose(0, 2, 1, 3).reshape(epochs * steps, len(sets), bs)
    wts = wts.reshape(shape).transpose(0, 2, 1, 3).reshape(epochs * steps, len(sets), bs)
    return idx, wts


def _fit(x, y, train_masks, lrs, wds, epochs, batch_size, num_classes, rng):
    stats = [_standardizer(x[m]) for m in train_masks]
    mean = np.stack([s[0] for s in stats]).astype(np.float32)
    std = np.stack([s[1] for s in stats]).astype(np.float32)
    idx, wts = _batches(train_masks, epochs, batch_size, rng)
    p = _train(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mean), jnp.asarray(std),
               jnp.asarray(idx), jnp.asarray(wts), jnp.asarray(lrs, jnp.float32),
               jnp.asarray(wds, jnp.float32), num_classes=num_classes)
    return p, mean, std


def fit_linear_probe(x_train, y_train, *, num_classes: Optional[int] = None,
                     lrs: Sequence[float] = (1e-3, 1e-2, 1e-1),
                     weight_decays: Sequence[float] = (0.0, 1e-2, 1e-1),
                     epochs: int = 15, batch_size: Optional[int] = 128, folds: Optional[int] = 5,
                     val_fraction: Optional[float] = None, seed: int = 0) -> LinearProbe:
    """Logistic-regression probe on (N, D) features with (lr, weight decay) chosen on a grid.

    Selection by stratified k-fold cross-validation (`folds`, default 5 as DMZ) or, if
    `val_fraction` is given, one stratified held-out split; the chosen pair is refitted on all of
    x_train. batch_size=None trains full-batch (one step per epoch: raise `epochs`). DDAE's probe
    is lrs=(1e-3,), weight_decays=(0.0,), epochs=15, batch_size=128.
    """
    x, y = _check_xy(x_train, y_train, "train")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 training examples, got {x.shape[0]}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    lrs, wds = tuple(float(v) for v in lrs), tuple(float(v) for v in weight_decays)
    if not lrs or not wds or min(lrs) <= 0 or min(wds) < 0:
        raise ValueError(f"need lrs > 0 and weight_decays >= 0, got {lrs}, {wds}")
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    rng = np.random.default_rng(seed)
    grid_lr, grid_wd = (a.ravel() for a in np.meshgrid(lrs, wds, indexing="ij"))

    val = _split_masks(y, folds, val_fraction, rng)
    p, mean, std = _fit(x, y, ~val, grid_lr, grid_wd, epochs, batch_size, k, rng)
    correct, ce = (np.asarray(a, np.float64).sum(0) for a in _evaluate(
        p, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mean), jnp.asarray(std), jnp.asarray(val)))
    n_val = val.sum()
    acc, ce = correct / n_val, ce / n_val
    best = int(np.lexsort((ce, -acc))[0])                      # best accuracy, then lowest CE

    everything = np.ones((1, x.shape[0]), bool)
    p, mean, std = _fit(x, y, everything, grid_lr[best:best + 1], grid_wd[best:best + 1], epochs,
                        batch_size, k, rng)
    return LinearProbe(weight=np.asarray(p["W"][0, 0], np.float64),
                       bias=np.asarray(p["b"][0, 0], np.float64), mean=mean[0].astype(np.float64),
                       std=std[0].astype(np.float64), lr=float(grid_lr[best]),
                       weight_decay=float(grid_wd[best]), val_accuracy=float(acc[best]),
                       grid_accuracy=acc.reshape(len(lrs), len(wds)), lrs=lrs, weight_decays=wds)


def probe_accuracy(x_train, y_train, x_test, y_test, **kw) -> dict:
    """Fits `fit_linear_probe(x_train, y_train, **kw)`; train / validation / test accuracy and the
    chosen hyper-parameters."""
    x_test, y_test = _check_xy(x_test, y_test, "test")
    probe = fit_linear_probe(x_train, y_train, **kw)
    return {"train_accuracy": probe.accuracy(x_train, y_train),
            "val_accuracy": probe.val_accuracy,
            "test_accuracy": probe.accuracy(x_test, y_test),
            "lr": probe.lr, "weight_decay": probe.weight_decay}


# ------------------------------------------------------------------------------- ridge probe
def r2_score(y_true, y_pred) -> float:
    """R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2, averaged over outputs (sklearn's
    'uniform_average'; an output with constant y scores 1 if predicted exactly, else 0)."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    yt = y_true.reshape(y_true.shape[0], -1)
    yp = y_pred.reshape(yt.shape)
    ss_res = np.sum((yt - yp) ** 2, axis=0)
    ss_tot = np.sum((yt - yt.mean(0)) ** 2, axis=0)
    safe = ss_tot > 0
    r2 = np.where(safe, 1.0 - ss_res / np.where(safe, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0))
    return float(np.mean(r2))


@dataclasses.dataclass
class RidgeRegression:
    """Ridge probe: y_hat = ((x - mean) / std) @ weight + bias."""
    weight: np.ndarray          # (D, P) on standardised features
    bias: np.ndarray            # (P,)
    mean: np.ndarray            # (D,)
    std: np.ndarray             # (D,)
    alpha: float                # chosen penalty
    val_r2: float               # mean validation R^2 of the chosen alpha
    grid_r2: np.ndarray         # (len(alphas),) mean validation R^2
    alphas: tuple
    vector_target: bool         # y was (N,): predictions are (N,)

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x must be (N, {self.weight.shape[0]}), got shape {x.shape}")
        out = ((x - self.mean) / self.std) @ self.weight + self.bias
        return out[:, 0] if self.vector_target else out

    def r2(self, x, y) -> float:
        x, y = _check_xy(x, y, "eval", regression=True)
        return r2_score(y, self.predict(x))


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """W(alpha) for every alpha from one eigendecomposition: (A, D, P), bias, mean, std."""
    mean, std = _standardizer(x)
    xs = (x - mean) / std
    y_mean = y.mean(0)
    s, v = np.linalg.eigh(xs.T @ xs)
    c = v.T @ (xs.T @ (y - y_mean))                                  # (D, P)
    w = np.einsum("de,aep->adp", v, c[None] / (np.maximum(s, 0.0)[None, :, None]
                                                   + alphas[:, None, None]))
    return w, y_mean, mean, std


def fit_linear_regression(x_train, y_train, *, alphas: Sequence[float] = (
        1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3), folds: Optional[int] = 5,
        val_fraction: Optional[float] = None, seed: int = 0) -> RidgeRegression:
    """Closed-form ridge on standardised features, alpha by k-fold (or held-out) validation R^2,
    refitted on all of x_train. y_train is (N,) or (N, P) (R^2 averaged over the P outputs)."""
    x, y = _check_xy(x_train, y_train, "train", regression=True)
    vector = y.ndim == 1
    y = y.reshape(y.shape[0], -1)
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or np.any(alphas <= 0):
        raise ValueError(f"alphas must be a non-empty list of positive penalties, got {alphas}")
    rng = np.random.default_rng(seed)
    val = _split_masks(np.zeros(x.shape[0]), folds, val_fraction, rng, stratify=False)
    scores = np.zeros((val.shape[0], alphas.size))
    for f, m in enumerate(val):
        w, b, mean, std = _ridge_path(x[~m], y[~m], alphas)
        pred = ((x[m] - mean) / std) @ w + b                          # (A, n_val, P)
        scores[f] = [r2_score(y[m], p) for p in pred]
    grid = scores.mean(0)
    best = int(np.argmax(grid))
    w, b, mean, std = _ridge_path(x, y, alphas[best:best + 1])
    return RidgeRegression(weight=w[0], bias=b, mean=mean, std=std, alpha=float(alphas[best]),
                           val_r2=float(grid[best]), grid_r2=grid, alphas=tuple(alphas.tolist()),
                           vector_target=vector)
