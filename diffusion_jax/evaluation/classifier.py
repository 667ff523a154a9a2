"""A small CNN classifier trained on the embedded data, whose penultimate layer is the feature
space of the sample-quality distances (the role Inception plays for FID).

    conv3x3(ch) -> [conv3x3 stride 2 (2^l ch) -> GroupNorm -> SiLU] x levels -> mean pool
    -> Dense(feature_dim) -> SiLU = features -> Dense(num_classes) = logits

Training: AdamW on cross-entropy, random minibatches; one jitted step called in a Python loop
(inside `lax.scan` XLA:CPU's convolution gradients are ~25x slower).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["FeatureClassifier", "TrainedClassifier", "train_feature_classifier"]


class FeatureClassifier(nn.Module):
    """`apply(vars, x) -> (logits, features)` for images x (B, H, W, C) in [-1, 1]."""
    num_classes: int
    ch: int = 32
    levels: int = 2
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.ch, (3, 3))(x)
        for l in range(self.levels):
            h = nn.Conv(self.ch * 2 ** (l + 1), (3, 3), strides=(2, 2))(nn.silu(h))
            h = nn.GroupNorm(num_groups=8)(h)
        h = nn.silu(h).mean(axis=(1, 2))
        f = nn.silu(nn.Dense(self.feature_dim)(h))
        return nn.Dense(self.num_classes)(f), f


@dataclasses.dataclass
class TrainedClassifier:
    """A trained `FeatureClassifier` with batched, jitted `features`, `predict` and `accuracy`."""
    module: FeatureClassifier
    params: Any
    train_accuracy: float

    def _apply(self, x, batch_size=512):
        fn = jax.jit(lambda p, xb: self.module.apply({"params": p}, xb))
        x = np.asarray(x, np.float32)
        logits, feats = [], []
        for i in range(0, len(x), batch_size):
            lo, f = fn(self.params, x[i:i + batch_size])
            logits.append(np.asarray(lo))
            feats.append(np.asarray(f))
        return np.concatenate(logits), np.concatenate(feats)

    def features(self, x) -> np.ndarray:
        """(N, feature_dim) penultimate-layer features."""
        return self._apply(x)[1]

    def predict(self, x) -> np.ndarray:
        return self._apply(x)[0].argmax(-1)

    def accuracy(self, x, y) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))


def train_feature_classifier(images, labels, *, num_classes: int | None = None, steps: int = 1500,
                             batch_size: int = 64, learning_rate: float = 2e-3,
                             weight_decay: float = 1e-4, ch: int = 32, levels: int = 2,
                             feature_dim: int = 128, seed: int = 0) -> TrainedClassifier:
    """Trains a `FeatureClassifier` on (images (N, H, W, C) in [-1, 1], integer labels (N,))."""
    x = jnp.asarray(images, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"need images (N, H, W, C) and labels (N,), got {x.shape} and {y.shape}")
    num_classes = int(num_classes or int(y.max()) + 1)
    module = FeatureClassifier(num_classes, ch=ch, levels=levels, feature_dim=feature_dim)
    key = jax.random.PRNGKey(seed)
    params = module.init(key, x[:1])["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=weight_decay)

    def loss(p, xb, yb):
        logits, _ = module.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, k, x, y):
        p, o = carry
        idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
        g = jax.grad(loss)(p, x[idx], y[idx])
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    # A Python loop over the jitted step, not one lax.scan: XLA:CPU runs convolution gradients
    # inside a while loop ~25x slower than the same step on its own (jax-ml/jax#12868).
    carry = (params, tx.init(params))
    for k in jax.random.split(jax.random.fold_in(key, 1), steps):
        carry = step(carry, k, x, y)
    params = carry[0]
    net = TrainedClassifier(module, params, 0.0)
    net.train_accuracy = net.accuracy(np.asarray(x), np.asarray(y))
    return net
