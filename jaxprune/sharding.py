"""Data parallelism: a 1-D mesh of devices with a "data" axis, and batches placed on it.

Every data pass of jaxprune (training, fine-tuning, evaluation, the criteria, the oracle)
places each batch on the mesh split along its leading axis and the variables on every device;
the jitted steps then run as one SPMD program, and XLA inserts the reductions over the data
axis (gradient means, statistic sums), so the results equal one device's to float rounding.
With one device nothing moves.

Several processes (hosts) work the same way through JAX's own runtime: after
`jaxprune.runtime.initialize_distributed` (``jax.distributed.initialize``) the mesh spans every
process's devices and every process runs the same program. Each process reads only the rows of
a batch that its own devices hold (`process_rows`; `jaxprune.data.Dataset.iterate` does this)
and `assemble_batch` makes the global batch from the processes' parts
(``jax.make_array_from_process_local_data``), so a global batch of a multi-host run equals the
batch one process would read. A host batch given whole to every process is placed the same way
(each process puts its own rows). `to_host` brings a result back to every process, gathering
rows held by other processes.
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


def process_rows(batch_size: int, mesh: Mesh | None) -> slice | None:
    """The rows of a global batch of `batch_size` that this process's devices hold when the
    batch is split over `mesh`'s data axis, or None when this process holds every row (one
    process, no mesh) or the batch does not split evenly over the devices (it is then read
    whole by every process and replicated).

    Raises:
      ValueError: this process's devices hold rows that are not one contiguous block (a mesh
        whose device order interleaves processes); build it with `make_mesh()`.
    """
    if mesh is None or batch_size % mesh.size:
        return None
    data_sharding = NamedSharding(mesh, P("data"))
    if data_sharding.is_fully_addressable:
        return None
    held = sorted(
        index[0].indices(batch_size)[:2]
        for index in data_sharding.addressable_devices_indices_map((batch_size,)).values()
    )
    for (_, stop), (start, _) in zip(held, held[1:], strict=False):
        if start != stop:
            raise ValueError(
                f"process {jax.process_index()} holds rows {held} of a batch of {batch_size}: "
                "not one block. Order the mesh's devices by process, as make_mesh() does."
            )
    return slice(held[0][0], held[-1][1])


def assemble_batch(local: Mapping[str, Any], batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch of `batch_size` rows split over `mesh`'s data axis, from this
    process's rows of it (`process_rows`); every process calls it with its own part."""
    data_sharding = NamedSharding(mesh, P("data"))
    return {
        name: jax.make_array_from_process_local_data(
            data_sharding, np.asarray(value), (batch_size, *np.shape(value)[1:])
        )
        for name, value in local.items()
    }


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
