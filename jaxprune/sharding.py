"""Data parallelism: a 1-D mesh of devices with a "data" axis, and batches placed on it.

Every data pass of jaxprune (training, fine-tuning, evaluation, the criteria, the oracle)
places each batch on the mesh split along its leading axis and the variables on every device;
the jitted steps then run as one SPMD program, and XLA inserts the reductions over the data
axis (gradient means, statistic sums), so the results equal one device's to float rounding.
With one device nothing moves.

Several processes (hosts) work the same way through JAX's own runtime: after
`jaxprune.runtime.initialize_distributed` (``jax.distributed.initialize``) the mesh spans every
process's devices, every process runs the same program on the same host batches, and each puts
only its own devices' rows on them (``jax.device_put`` of a host array onto a global sharding).
`to_host` brings a result back to every process, gathering rows held by other processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis ``"data"`` over `devices` (default: every device of every
    process)."""
    devices = list(devices) if devices is not None else jax.devices()
    if not devices:
        raise ValueError("make_mesh needs at least one device.")
    return Mesh(np.asarray(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError when `batch_size` does not split evenly over the mesh's devices."""
    if batch_size % mesh.size:
        lower = batch_size - batch_size % mesh.size
        choices = f"{lower} or {lower + mesh.size}" if lower else str(mesh.size)
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
            f"use a multiple of {mesh.size} (e.g. {choices})."
        )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along its leading (batch) axis.

    Args:
      batch: a dict of arrays with the same leading dimension.
      mesh: a mesh from `make_mesh`.

    Returns:
      The batch as global arrays sharded with ``NamedSharding(mesh, P("data"))``.

    Raises:
      ValueError: the batch size is not divisible by the number of devices.
    """
    sizes = {np.shape(value)[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}.")
    check_batch_size(sizes.pop(), mesh)
    return jax.device_put(dict(batch), NamedSharding(mesh, P("data")))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of `tree` on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def default_mesh() -> Mesh | None:
    """A mesh of every device (of every process) when there are several; None (stay put)
    with one."""
    return make_mesh() if jax.device_count() > 1 else None


def to_host(tree: PyTree) -> PyTree:
    """Every array of `tree` as a NumPy array on this host, whole: rows held by other
    processes' devices are gathered (`jax.experimental.multihost_utils.process_allgather`)."""

    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree_util.tree_map(fetch, tree)


def place_batch(batch: Mapping[str, Any], mesh: Mesh | None) -> Mapping[str, Any]:
    """Puts a host batch on the mesh: split along the data axis when its size divides evenly
    over the devices, else on every device whole (the same result, without the speed-up; a
    short last batch). No mesh, or a mesh of one device: the batch as given.

    Args:
      batch: a dict of arrays with the same leading dimension.
      mesh: the mesh, or None.

    Returns:
      The batch, placed.

    Raises:
      ValueError: the arrays disagree on the batch size.
    """
    if mesh is None:
        return batch
    sizes = {np.shape(value)[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}.")
    if mesh.size == 1:
        return batch
    if sizes.pop() % mesh.size:
        return replicate(dict(batch), mesh)
    return jax.device_put(dict(batch), NamedSharding(mesh, P("data")))
