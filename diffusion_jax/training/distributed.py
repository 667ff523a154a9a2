"""Multi-process helpers: initialisation, global batches from per-process shards, host gathers.

Nothing in `diffusion_jax.training` assumes one process. The conventions:

* every process runs the same program on the same global mesh (`make_mesh` over `jax.devices()`);
* each process loads only its share of every global batch: rows
  [p * B / P, (p + 1) * B / P) for process p of P (what `diffusion_jax.data.make_loader` yields),
  and `shard_batch` assembles the global `jax.Array` with `jax.make_array_from_process_local_data`;
* checkpoints are written and read collectively by all processes (Orbax);
* host-side side effects (metrics files, logs) happen on process 0 only (`is_primary`).

For several processes on one CPU host (tests), pass `cpu_collectives='gloo'` (the default) so
cross-process collectives work on the CPU backend.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax.training import mesh as mesh_lib

log = logging.getLogger(__name__)

__all__ = ["maybe_initialize", "is_primary", "process_batch_rows", "check_process_batch_layout",
           "shard_batch", "to_host", "replicate", "sync", "any_process"]


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     local_device_ids: int | Sequence[int] | None = None, *,
                     cpu_collectives: str | None = "gloo",
                     initialization_timeout: int = 300) -> bool:
    """Calls `jax.distributed.initialize` when a multi-process run is configured.

    Configured means: `coordinator_address` given, or `num_processes` > 1, or the environment
    variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set (then those
    supply the missing arguments). Otherwise (single process) nothing happens and False is returned.
    Must run before anything touches a JAX backend. Idempotent: returns True if already initialised.
    `cpu_collectives` selects the CPU backend's cross-process collectives ('gloo' or 'mpi'; only
    set if still at its default).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and (num_processes is None or num_processes <= 1):
        return False
    if coordinator_address is None:
        raise ValueError(f"num_processes={num_processes} needs a coordinator_address "
                         f"('host:port' of process 0)")
    if cpu_collectives and jax.config.jax_cpu_collectives_implementation in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    log.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
             coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def process_batch_rows(mesh: Mesh, global_batch_size: int,
                       process_index: int | None = None) -> tuple[int, int]:
    """[start, stop) rows of the global batch held by `process_index`'s devices under
    `batch_sharding(mesh)`; ValueError if they are not one contiguous block."""
    p = jax.process_index() if process_index is None else process_index
    sharding = mesh_lib.batch_sharding(mesh)
    idx = sharding.devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                   for d, s in idx.items() if d.process_index == p})
    if not rows:
        raise ValueError(f"process {p} holds no device of the mesh")
    for (a, b), (c, _) in zip(rows, rows[1:]):
        if b != c:
            raise ValueError(f"process {p}'s batch rows {rows} are not contiguous on this mesh")
    return rows[0][0], rows[-1][1]


def check_process_batch_layout(mesh: Mesh, global_batch_size: int) -> None:
    """Checks that process p's devices hold exactly rows [p B/P, (p+1) B/P) of the global batch,
    the slice a per-process loader (`diffusion_jax.data`) reads; ValueError otherwise."""
    mesh_lib.check_batch_divisible(global_batch_size, mesh)
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the number of "
                         f"processes {n}")
    local = global_batch_size // n
    p = jax.process_index()
    got = process_batch_rows(mesh, global_batch_size, p)
    if got != (p * local, (p + 1) * local):
        raise ValueError(
            f"on this mesh process {p} holds batch rows {got}, but its data loader reads rows "
            f"{(p * local, (p + 1) * local)}; order the mesh devices by process (make_mesh does)")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Per-process host batch (leading axis = global batch / process_count) -> global `jax.Array`s
    sharded by `batch_sharding(mesh)`. Leaves that already are global jax.Arrays with that sharding
    pass through. Single process: the local batch is the global batch."""
    sharding = mesh_lib.batch_sharding(mesh)
    n = jax.process_count()

    def one(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding and (
                n == 1 or not leaf.is_fully_addressable):
            return leaf
        local = np.asarray(leaf)
        if local.ndim == 0:
            raise ValueError("every batch array needs a leading batch axis, got a scalar")
        global_shape = (local.shape[0] * n, *local.shape[1:])
        mesh_lib.check_batch_divisible(global_shape[0], mesh)
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map(one, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (identical on every process) -> fully replicated global arrays on `mesh`."""
    sharding = mesh_lib.replicated(mesh)

    def one(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (an all-gather when multi-process)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def sync(name: str) -> None:
    """Barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective when multi-process)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.any(flags))

