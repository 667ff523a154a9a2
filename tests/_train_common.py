"""Shared pieces of the training tests and their subprocess workers (no jax device use at import).

A tiny conv/dense denoiser whose parameters carry logical axis names like the real networks
(`diffusion_jax.networks`), the real eps objective on the VP process, and a small in-memory
dataset behind the real grain loader whose source records which example indices it read.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

H, W, C = 8, 8, 2
NUM_EXAMPLES = 64


def _init(axes, base=None):
    return nn.with_logical_partitioning(base or nn.initializers.lecun_normal(), axes)


def _bias(axes=("bias",)):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class TinyDenoiser(nn.Module):
    """conv(C->ch) + time -> dense(ch->4ch) -> dense(4ch->ch) -> conv(ch->C); logical names."""
    ch: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del cond, train
        conv_axes = ("conv_h", "conv_w", "conv_in", "conv_out")
        temb = nn.Dense(self.ch, kernel_init=_init(("cond", "embed")), bias_init=_bias(),
                        dtype=self.dtype, name="temb")(jnp.asarray(t, jnp.float32)[:, None])
        h = nn.Conv(self.ch, (3, 3), kernel_init=_init(conv_axes), bias_init=_bias(),
                    dtype=self.dtype, name="conv_in")(x)
        h = nn.silu(h + temb[:, None, None, :])
        h = nn.Dense(4 * self.ch, kernel_init=_init(("embed", "mlp")), bias_init=_bias(),
                     dtype=self.dtype, name="mlp_in")(h)
        h = nn.Dense(self.ch, kernel_init=_init(("mlp", "embed")), bias_init=_bias(),
                     dtype=self.dtype, name="mlp_out")(nn.silu(h))
        out = nn.Conv(x.shape[-1], (3, 3), kernel_init=_init(conv_axes), bias_init=_bias(),
                      dtype=self.dtype, name="conv_out")(nn.silu(h))
        return out.astype(jnp.float32)


def make_model(ch: int = 16, dtype=jnp.float32):
    """(module, init_params_fn(key) -> boxed params, loss_fn(params, batch, rng))."""
    from diffusion_jax.objectives import epsilon_loss
    from diffusion_jax.processes import get_process

    module = TinyDenoiser(ch=ch, dtype=dtype)

    def init_params_fn(key):
        return module.init(key, jnp.zeros((1, H, W, C)), jnp.zeros((1,)))["params"]

    def apply_fn(params, x, t, cond=None, *, train=False, rng=None):
        return module.apply({"params": params}, x, t, cond, train=train)

    loss_fn = epsilon_loss(get_process("vp"), apply_fn)
    return module, init_params_fn, loss_fn


def make_source(n: int = NUM_EXAMPLES, seed: int = 0):
    """A `diffusion_jax.data.ArraySource` that logs every `get_batch` call's indices."""
    from diffusion_jax import data as D

    class RecordingSource(D.ArraySource):
        def __init__(self, arrays):
            super().__init__(arrays)
            self.reads: list[list[int]] = []

        def get_batch(self, indices):
            self.reads.append([int(i) for i in indices])
            return super().get_batch(indices)

    rs = np.random.RandomState(seed)
    return RecordingSource({"image": rs.randint(0, 256, (n, H, W, C)).astype(np.uint8),
                            "label": np.arange(n, dtype=np.int64)})


def make_loader(source, batch_size: int, seed: int = 0):
    """Synchronous (no prefetch threads) grain loader: reads happen exactly when batches are
    consumed, so `source.reads` is the per-step read log."""
    from diffusion_jax import data as D
    return D.make_loader(source, batch_size=batch_size, seed=seed, random_flip=True,
                         num_threads=0, prefetch_batches=0)


class LoggingIterator:
    """Wraps a checkpointable iterator; records (position before next, labels) per batch."""

    def __init__(self, it):
        self.it, self.log = it, []

    def __iter__(self):
        return self

    def __next__(self):
        pos = self.it.get_state()
        batch = next(self.it)
        self.log.append({"pos": pos, "labels": np.asarray(batch["label"]).tolist()})
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_tree(tree):
    from diffusion_jax.training import to_host
    return to_host(tree)


def save_tree(path: str, tree) -> None:
    flat = jax.tree_util.tree_flatten_with_path(host_tree(tree))[0]
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})


def load_tree(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


RESUME_BATCH = 8


def resume_config(num_steps: int, checkpoint_every: int = 3, devices: int = 2):
    """The TrainConfig of the resume tests (fsdp over all devices, cosine schedule, EMA)."""
    from diffusion_jax import training as T
    return T.TrainConfig(
        num_steps=num_steps, seed=0, mesh_shape=(1, -1, 1),
        optimizer=T.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, schedule="cosine",
                                    total_steps=64, weight_decay=0.01),
        ema_decays=(0.9, 0.99), ema_warmup=True, log_every=1, checkpoint_every=checkpoint_every,
        max_to_keep=2, async_checkpointing=True)
