"""The (t, block) readout sweep: which noise level and which block make the best representation.

For every t of `timesteps` and every block, features of the train and test images are read once
(`extract_features`: every block and every t from the same vmapped network passes), then scored by
a linear probe (`fit_linear_probe`, test accuracy) and / or weighted k-NN (`knn_accuracy`).
DDAE finds the best cell at low noise in a middle decoder block.

Host memory: the features of every (t, block) are held at once, 4 T N sum_b C_b bytes per split
(CIFAR-10 train, 4 t x 6 blocks of 256 channels: 1.2 GB); sweep fewer blocks per call if needed.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from diffusion_jax.networks import block_names
from diffusion_jax.processes.base import Process
from diffusion_jax.readouts.features import check_blocks, check_timesteps, extract_features
from diffusion_jax.readouts.knn import knn_accuracy
from diffusion_jax.readouts.probe import fit_linear_probe

METHODS = ("linear", "knn")


@dataclasses.dataclass
class SweepResult:
    """Accuracy grids (len(timesteps), len(blocks)) per method; `details` holds the linear probe's
    validation / train accuracy and chosen hyper-parameters on the same grid."""
    timesteps: tuple
    blocks: tuple
    accuracy: dict            # method -> (T, nB) test accuracy
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def methods(self) -> tuple:
        return tuple(self.accuracy)

    def grid(self, method: Optional[str] = None) -> np.ndarray:
        method = method or self.methods[0]
        if method not in self.accuracy:
            raise ValueError(f"no {method!r} results; this sweep has {self.methods}")
        return np.asarray(self.accuracy[method])

    def best(self, method: Optional[str] = None, on: str = "test") -> dict:
        """The best cell: {'t', 'block', 'accuracy' (test), 'index'}. on='val' selects by the linear
        probe's validation accuracy instead of (optimistically) by test accuracy."""
        grid = self.grid(method)
        if on == "val":
            if "linear_val" not in self.details:
                raise ValueError("on='val' needs the linear probe's validation grid")
            score = np.asarray(self.details["linear_val"])
        elif on == "test":
            score = grid
        else:
            raise ValueError(f"on must be 'test' or 'val', got {on!r}")
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        return {"t": float(self.timesteps[i]), "block": self.blocks[j],
                "accuracy": float(grid[i, j]), "index": (int(i), int(j))}

    def to_dict(self) -> dict:
        return {"timesteps": [float(t) for t in self.timesteps], "blocks": list(self.blocks),
                "accuracy": {m: np.asarray(g).tolist() for m, g in self.accuracy.items()},
                "best": {m: self.best(m) for m in self.accuracy},
                "details": {k: np.asarray(v).tolist() for k, v in self.details.items()}}

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text: str) -> "SweepResult":
        d = json.loads(text)
        return cls(tuple(d["timesteps"]), tuple(d["blocks"]),
                   {m: np.asarray(g) for m, g in d["accuracy"].items()},
                   {k: np.asarray(v) for k, v in d.get("details", {}).items()})


def probe_sweep(module, params, train_images, train_labels, test_images, test_labels, *,
                process: Process, timesteps, blocks: Optional[Sequence[str]] = None, key,
                methods: Sequence[str] = METHODS, batch_size: int = 64,
                cond_train: Optional[Mapping[str, Any]] = None,
                cond_test: Optional[Mapping[str, Any]] = None, batch_stats=None,
                pool: str = "gap", share_noise: bool = False,
                probe_kwargs: Optional[dict] = None, knn_kwargs: Optional[dict] = None
                ) -> SweepResult:
    """Linear-probe and / or k-NN test accuracy for every (t, block); blocks=None: every block.

    Train and test features use noise keys fold_in(key, 0) and fold_in(key, 1); `probe_kwargs` go
    to `fit_linear_probe`, `knn_kwargs` to `knn_accuracy`.
    """
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad or methods}; known: {METHODS}")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for what, im, lab in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if lab.shape != (np.shape(im)[0],):
            raise ValueError(f"label/feature length mismatch: {what}_images has {np.shape(im)[0]} "
                             f"examples, {what}_labels has shape {lab.shape}")
    shape = np.shape(train_images)
    blocks = tuple(block_names(module, shape)) if blocks is None else check_blocks(module, shape,
                                                                                     blocks)
    ts = check_timesteps(process, timesteps)
    kw = dict(process=process, batch_size=batch_size, pool=pool, batch_stats=batch_stats,
              share_noise=share_noise)
    f_train = extract_features(module, params, train_images, ts, blocks, key=jax.random.fold_in(key, 0),
                               cond=cond_train, **kw)
    f_test = extract_features(module, params, test_images, ts, blocks, key=jax.random.fold_in(key, 1),
                              cond=cond_test, **kw)
    grid = (len(ts), len(blocks))
    acc = {m: np.zeros(grid) for m in methods}
    details = {k: np.zeros(grid) for k in ("linear_val", "linear_train", "linear_lr",
                                           "linear_weight_decay")} if "linear" in methods else {}
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    for j, b in enumerate(blocks):
        for i in range(len(ts)):
            xtr, xte = f_train[b][i].reshape(len(train_labels), -1), f_test[b][i].reshape(
                len(test_labels), -1)
            if "linear" in methods:
                probe = fit_linear_probe(xtr, train_labels, num_classes=num_classes,
                                         **(probe_kwargs or {}))
                acc["linear"][i, j] = probe.accuracy(xte, test_labels)
                details["linear_val"][i, j] = probe.val_accuracy
                details["linear_train"][i, j] = probe.accuracy(xtr, train_labels)
                details["linear_lr"][i, j] = probe.lr
                details["linear_weight_decay"][i, j] = probe.weight_decay
            if "knn" in methods:
                acc["knn"][i, j] = knn_accuracy(xtr, train_labels, xte, test_labels,
                                                num_classes=num_classes, **(knn_kwargs or {}))
    return SweepResult(tuple(float(t) for t in ts), blocks, acc, details)
