"""Device mesh, logical-axis -> mesh shardings, and batch sharding.

Mesh axes are always ('data', 'fsdp', 'tensor'). `make_mesh((-1, 1, 1))` puts every device on
'data'; one -1 fills whatever the other sizes leave. The mesh uses `AxisType.Auto` axes (jit with
in/out shardings, GSPMD-style), not the Explicit axes that `jax.make_mesh` defaults to.

Parameters (and anything shaped like them: optimiser moments, EMA copies) carry logical axis names
(`nn.with_logical_partitioning`); `logical_shardings` maps them through a rules table
(`DEFAULT_LOGICAL_AXIS_RULES` of `diffusion_jax.networks.partitioning`) onto the mesh:

* a dimension is sharded over its mesh axis (or axes) only when the product of their sizes divides
  it; otherwise that dimension is replicated, and the fallback is logged (INFO) once per
  (parameter path, dimension);
* mesh axes of size 1 are dropped from the specs (they shard nothing), so on a (8, 1, 1) mesh
  every parameter is plainly replicated: pure data parallelism;
* unboxed leaves (step counters, rng, optax counts) are replicated.

The batch is sharded on its leading axis over ('data', 'fsdp') together (maxdiffusion style: fsdp
devices also take a slice of the batch, so fsdp = all-gather the weights, data-parallel compute);
'tensor' devices see the same examples. The global batch must divide by data * fsdp.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusion_jax.networks.partitioning import DEFAULT_LOGICAL_AXIS_RULES

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_LOGICAL_AXIS_RULES", "resolve_mesh_shape",
           "make_mesh", "logical_shardings", "fit_spec", "replicated", "batch_sharding",
           "batch_shardings", "logical_to_mesh_spec", "batch_divisor", "check_batch_divisible", "describe_shardings"]


def resolve_mesh_shape(shape: Sequence[int] | Mapping[str, int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Sizes for `axis_names` with at most one -1 filled in; ValueError if they do not multiply
    to `num_devices`. `shape` is a sequence in `axis_names` order or a {axis: size} mapping
    (missing axes are 1)."""
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(axis_names)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {tuple(axis_names)}")
        shape = [shape.get(a, 1) for a in axis_names]
    shape = [int(s) for s in shape]
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} must have one size per axis {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {tuple(shape)} over axes {tuple(axis_names)}: {num_devices} devices do "
                f"not divide by the fixed sizes' product {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {tuple(shape)} over axes {tuple(axis_names)} needs {math.prod(shape)} "
            f"devices, but there are {num_devices} (jax.device_count()); use -1 for one axis to "
            f"fill the rest")
    return tuple(shape)


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1),
              axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over all (global) devices, or `devices`, with Auto axis types.

    Devices are ordered by `jax.make_mesh` (topology-aware on TPU); across processes the leading
    axes span processes, so each process' devices hold a contiguous block of the batch. In a
    single process, a `shape` of fixed sizes (no -1) that asks for fewer devices than there are
    takes the first ones (e.g. (1, 1, 1): one device of eight, for debugging or small runs); with
    several processes the mesh must span every device.
    """
    if devices is None:
        devices = jax.devices()
        fixed = list(shape.values()) if isinstance(shape, Mapping) else list(shape)
        wanted = math.prod(int(s) for s in fixed)
        if -1 not in fixed and 0 < wanted < len(devices) and jax.process_count() == 1:
            log.info("mesh %s uses %d of the %d devices", tuple(fixed), wanted, len(devices))
            devices = devices[:wanted]
    devices = list(devices)
    sizes = resolve_mesh_shape(shape, len(devices), axis_names)
    return jax.make_mesh(sizes, tuple(axis_names), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices)


def _axes_tuple(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
             name: str = "") -> PartitionSpec:
    """`spec` restricted to what `mesh` can do for an array of `shape`: mesh axes missing from the
    mesh or of size 1 are dropped, and a dimension the remaining axes do not divide is replicated
    (logged)."""
    out = []
    for i, dim in enumerate(shape):
        axes = _axes_tuple(spec[i] if i < len(spec) else None)
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            log.info("sharding fallback: %s dim %d (size %d) is not divisible by mesh axes %s "
                     "(size %d): replicated", name or "array", i, dim, axes, size)
            axes = ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_to_mesh_spec(names: Sequence[str | None],
                         rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """Logical dim names -> mesh `PartitionSpec` (flax's semantics: per dimension the first rule
    for its name whose mesh axes are not yet used by another dimension; unknown names and
    None-rules replicate). Unlike flax, a logical name may label several dimensions."""
    used: set[str] = set()
    out = []
    for name in names:
        choice = None
        if name is not None:
            for logical, axes in rules:
                if logical != name:
                    continue
                axes_t = _axes_tuple(axes)
                if not axes_t:
                    break
                if used.isdisjoint(axes_t):
                    choice = axes
                    used.update(axes_t)
                    break
        out.append(tuple(choice) if isinstance(choice, list) else choice)
    return PartitionSpec(*out)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
    """`NamedSharding` tree for a (possibly boxed) abstract tree, e.g. `jax.eval_shape(init_fn)`.

    Boxed leaves (`nn.LogicallyPartitioned`) map their logical names through `rules`; the result has
    the structure of `nn.unbox(abstract_tree)` (plain arrays) with divisibility fallbacks applied.
    Unboxed array leaves are replicated.
    """
    logical = nn.get_partition_spec(abstract_tree)
    unboxed = nn.unbox(abstract_tree)
    rules = [tuple(r) for r in rules]

    def one(path, spec, leaf):
        names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        mesh_spec = logical_to_mesh_spec(names, rules)
        return NamedSharding(mesh, fit_spec(mesh_spec, getattr(leaf, "shape", ()), mesh,
                                            _path_name(path)))

    return jax.tree_util.tree_map_with_path(
        one, logical, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Number of batch shards: product of the sizes of the batch axes ('data', 'fsdp') present."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'); other axes replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "global batch") -> None:
    """ValueError unless the batch splits evenly over the batch axes of `mesh`."""
    n = batch_divisor(mesh)
    if global_batch_size % n:
        sizes = {a: mesh.shape[a] for a in BATCH_AXES if a in mesh.shape}
        raise ValueError(
            f"{what} size {global_batch_size} is not divisible by the mesh's batch axes "
            f"{sizes} (data * fsdp = {n}); use a multiple of {n} or another mesh shape")


def batch_shardings(batch_spec: Any, mesh: Mesh) -> Any:
    """`batch_sharding(mesh)` for every leaf of a batch (spec) tree; checks divisibility."""
    sh = batch_sharding(mesh)

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        if not shape:
            raise ValueError(f"batch leaf {_path_name(path)!r} is a scalar; every batch array needs "
                             f"a leading batch axis")
        check_batch_divisible(shape[0], mesh, f"batch[{_path_name(path)!r}] batch")
        return sh

    return jax.tree_util.tree_map_with_path(one, batch_spec)


def describe_shardings(shardings: Any) -> dict[str, str]:
    """{path: str(PartitionSpec)} for logging / tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {_path_name(p): str(s.spec) for p, s in flat}

