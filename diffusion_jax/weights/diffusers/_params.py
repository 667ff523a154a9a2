"""Filling a Flax parameter tree from a PyTorch state dict, key by key, with the checks every
converter needs: each Flax parameter is read from a named tensor (or one of its legacy names) of the
right shape, and every tensor of the file is consumed, otherwise `WeightsError` names the key.

Layout changes: Linear (out, in) -> Dense kernel (in, out); Conv2d (out, in, kh, kw) -> Conv kernel
(kh, kw, in, out); vectors and embedding tables unchanged. Values become float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.weights.diffusers.folder import WeightsError

# (candidate torch names, first is the current diffusers name) for one Flax parameter path.
NameFn = Callable[[tuple[str, ...]], Sequence[str]]


class StateDict:
    """A state dict whose tensors are taken once each; `finish` fails on any left over."""

    def __init__(self, state: dict, source: str):
        self.state = dict(state)
        self.source = source
        self.taken: set[str] = set()

    def take(self, names: Sequence[str]) -> tuple[str, np.ndarray]:
        """(name, array) of the first of `names` present; WeightsError naming names[0] if none."""
        for n in names:
            if n in self.state:
                if n in self.taken:
                    raise WeightsError(f"{self.source}: tensor {n!r} mapped twice (converter bug)")
                self.taken.add(n)
                return n, np.asarray(self.state[n])
        alt = f" (nor its legacy name{'s' if len(names) > 2 else ''} {list(names[1:])})" \
            if len(names) > 1 else ""
        raise WeightsError(f"{self.source}: missing tensor {names[0]!r}{alt}")

    def take_optional(self, name: str):
        """The array `name` if present (marked consumed), else None."""
        if name not in self.state:
            return None
        return self.take([name])[1]

    def finish(self) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise WeightsError(f"{self.source}: unexpected tensor{'s' if len(left) > 1 else ''} "
                               f"{left[:5]}{more}: not part of the converted architecture "
                               "(a different config or model class?)")


def to_flax(name: str, array: np.ndarray, target_shape: tuple[int, ...], source: str,
            leaf: str = "kernel") -> np.ndarray:
    """torch tensor `name` -> float32 array of `target_shape` for a Flax `leaf` (kernels are
    transposed, see the module docstring; a (out, in, 1, 1) conv may feed a Dense kernel)."""
    a = np.asarray(array, np.float32)
    if leaf == "kernel" and len(target_shape) == 4 and a.ndim == 4:
        a = a.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(target_shape) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
        a = a[:, :, 0, 0].T
    elif leaf == "kernel" and len(target_shape) == 2 and a.ndim == 2:
        a = a.T
    if a.shape != tuple(target_shape):
        raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(np.shape(array))}, which "
                           f"does not fit the configured parameter of shape {tuple(target_shape)}")
    return a


def fill_params(abstract_params, names: NameFn, state: StateDict) -> dict:
    """The 'params' tree of `abstract_params` (boxed or not) read from `state` via `names`.

    `names(path)` gives the torch names for the Flax path (module names..., leaf), leaf one of
    'kernel' | 'bias' | 'scale' | 'embedding'. Returns device float32 arrays."""
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract_params))
    out = {}
    for path, leaf in flat.items():
        cands = list(names(tuple(path)))
        name, arr = state.take(cands)
        out[path] = jnp.asarray(to_flax(name, arr, tuple(leaf.shape), state.source, path[-1]))
    return flax.traverse_util.unflatten_dict(out)


def torch_suffix(leaf: str) -> str:
    """Flax leaf name -> torch parameter suffix."""
    return "bias" if leaf == "bias" else "weight"


def abstract_params(module: nn.Module, *args, method=None):
    """`jax.eval_shape` of module.init(...)['params'] (no FLOPs)."""
    kw = {} if method is None else {"method": method}
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))["params"]
