"""Logical axis names for the denoiser parameters and their mapping onto a device mesh.

Every parameter of `UNet` and `DiT` is created through `nn.with_logical_partitioning`, so
`jax.eval_shape(module.init, ...)` returns a tree of `nn.LogicallyPartitioned` boxes that carry one
logical name per array dimension. One table of rules, `DEFAULT_LOGICAL_AXIS_RULES`, maps those names
onto a `jax.sharding.Mesh` with axes ('data', 'fsdp', 'tensor'):

    name            dimension it labels                                    default mesh axis
    'embed'         input features of a Dense (DiT width, UNet channels)   'fsdp'
    'mlp'           output features of a Dense (MLP hidden, modulation)    'tensor'
    'heads'         fused heads * head_dim of q/k/v projections            'tensor'
    'conv_in'       input channels of a convolution kernel                 'fsdp'
    'conv_out'      output channels of a convolution kernel                'tensor'
    'conv_h'        kernel height                                          None
    'conv_w'        kernel width                                           None
    'classes'       rows of the class-embedding table                      None
    'cond'          input features of a Dense fed by the latent z          None
    'norm'          GroupNorm / LayerNorm scales and biases                None
    'bias'          Dense / Conv biases                                    None
    'batch'         batch dimension of activations (not a parameter)       ('data', 'fsdp')

Divisibility: a weight dimension is sharded over a mesh axis only when the mesh-axis size divides
it. `param_shardings` enforces this itself: a dimension whose size is not a multiple of the
(product of the) mesh-axis sizes it maps to, or that maps to a mesh axis missing from the mesh, is
replicated instead (e.g. the 3 input channels of the UNet stem on an fsdp=4 mesh); size-1 mesh axes
are dropped from the specs. With 'fsdp' = 'tensor' = 1 everything is replicated (pure data
parallelism). If two dims of one array map to the same mesh axis, the earlier rule in the table
wins and the other dim is replicated (flax's rule-priority semantics).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CONV_H = "conv_h"
CONV_W = "conv_w"
CLASSES = "classes"
COND = "cond"
NORM = "norm"
BIAS = "bias"
BATCH = "batch"

LOGICAL_AXIS_NAMES = (EMBED, MLP, HEADS, CONV_IN, CONV_OUT, CONV_H, CONV_W, CLASSES, COND, NORM,
                      BIAS, BATCH)

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (CONV_IN, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (CONV_OUT, "tensor"),
    (CONV_H, None),
    (CONV_W, None),
    (CLASSES, None),
    (COND, None),
    (NORM, None),
    (BIAS, None),
)


def logical_param_specs(abstract_variables):
    """Tree of logical `PartitionSpec`s (one logical name per dim) for boxed variables."""
    return nn.get_partition_spec(abstract_variables)


def _axis_size(mesh: Mesh, axis) -> int | None:
    """Product of the mesh sizes of `axis` (str or tuple); None if an axis is not in the mesh."""
    names = axis if isinstance(axis, tuple) else (axis,)
    if any(a not in mesh.shape for a in names):
        return None
    return int(np.prod([mesh.shape[a] for a in names]))


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replaces by None every mesh axis missing from `mesh`, of size 1, or not dividing the dim."""
    out = []
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        if axis is not None:
            size = _axis_size(mesh, axis)
            if size is None or size == 1 or dim % size != 0:
                axis = None
        out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def param_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_LOGICAL_AXIS_RULES):
    """`NamedSharding` tree (unboxed structure) for `abstract_variables` on `mesh` under `rules`.

    Logical names go through `nn.logical_to_mesh` (flax's rule semantics); the mesh specs are then
    fitted to the shapes and the mesh (see the module docstring) before building the shardings
    (`nn.logical_to_mesh_sharding` itself would fail on a mesh that lacks a ruled axis).
    `abstract_variables` is the boxed output of `jax.eval_shape(module.init, ...)` (or any subtree,
    e.g. its 'params'). The result has the structure of `nn.unbox(abstract_variables)` and can be
    passed as `out_shardings` of a jitted init or to `jax.device_put`. Dimensions that the mapped
    mesh axes do not divide are replicated (see the module docstring).
    """
    mesh_specs = nn.logical_to_mesh(logical_param_specs(abstract_variables), list(rules))
    shapes = nn.unbox(abstract_variables)

    def fit(spec, leaf):
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh))

    return jax.tree_util.tree_map(fit, mesh_specs, shapes,
                                  is_leaf=lambda s: isinstance(s, PartitionSpec))
