"""The fitness of a population of candidate prunings, in one vmapped call per batch and chunk.

Each candidate is a set of channel masks (1 kept, 0 removed). Because gates are traced inputs
(`jaxprune.gates`), a stack of masks runs through `map_over_masks` (vmap) in one compiled call:
the candidates share the weights and the images, only the masks differ. Candidates are split
into chunks of a fixed size (the last one padded) so memory stays bounded and the call
compiles once; with several devices, each chunk's candidate axis is sharded over them.
Identical candidates (common once the search converges) are evaluated once. The chunk size can
be left to `auto_chunk_size`: one candidate per call on a CPU (measured fastest), a wide chunk
on accelerators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.criteria.base import batch_arrays, model_output, softmax_cross_entropy
from jaxprune.gates import gated_call, map_over_masks
from jaxprune.graph import ChannelGraph
from jaxprune.sharding import to_host

# (variables, masks chunk {group: (C, size)}, images, labels) -> (correct (C,), loss sum (C,)).
ChunkFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, jax.Array], tuple[Any, Any]]


class PopulationFitness(NamedTuple):
    """Accuracy and mean loss of every candidate, and how many distinct ones were run."""

    accuracy: np.ndarray  # (population,) float64
    loss: np.ndarray  # (population,) float64
    evaluated: int  # distinct candidates evaluated


def make_chunk_fn(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> ChunkFn:
    """A jitted function scoring a chunk of candidates on one batch.

    Args:
      apply_fn: the model function the graph was built from.
      graph: its channel graph.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).
      loss_fn: (logits, labels) -> per-example loss.

    Returns:
      ``fn(variables, masks, images, labels) -> (correct, loss_sum)``, each of shape (C,) for
      C candidates (masks: per group an array (C, group size)).
    """
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)

    def chunk(variables, masks, images, labels):
        def one(candidate_masks):
            logits = model_output(
                gated_call(apply_fn, graph, variables, images, candidate_masks, **kwargs)
            )
            correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
            return correct, jnp.sum(loss_fn(logits, labels))

        return map_over_masks(one, masks)

    return jax.jit(chunk)


def unique_candidates(
    mask_stack: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The distinct candidates of a stack of masks, and where each original one went.

    Args:
      mask_stack: per group, an array (population, group size).

    Returns:
      (unique stack in sorted row order, inverse) with ``unique[g][inverse] == mask_stack[g]``.
    """
    names = list(mask_stack)
    flat = np.concatenate([np.asarray(mask_stack[n], np.float32) for n in names], axis=1)
    rows, inverse = np.unique(flat, axis=0, return_inverse=True)
    splits = np.cumsum([np.shape(mask_stack[n])[1] for n in names])[:-1]
    parts = np.split(rows, splits, axis=1)
    return dict(zip(names, parts, strict=True)), np.asarray(inverse).reshape(-1)


# Automatic chunk size (`auto_chunk_size`). On a CPU, one candidate per call: measured with
# experiments/bench/population.py (VGG-small, 32 candidates x 256 images, 2-core CPU), every
# chunk of 2 to 32 candidates was 1.2-3.6x slower than chunks of 1 at each batch size of 64, 128
# and 256, also at equal images per call (2 x 64 slower than 1 x 256), so the vmap over
# candidates costs on XLA:CPU beyond the working set, and the batch size barely matters there.
CPU_CHUNK = 1
# On accelerators one wide call fills the device: ACCELERATOR_CHUNK candidates per call, fewer
# when a call would hold more than ACCELERATOR_MAX_IMAGES images of activations (a memory bound).
# A choice, not measured in this repository (no accelerator here).
ACCELERATOR_CHUNK = 32
ACCELERATOR_MAX_IMAGES = 8192


def auto_chunk_size(platform: str, batch_size: int, *, devices: int = 1) -> int:
    """The chunk size that `population_fitness` uses when given ``chunk_size=0``.

    Args:
      platform: the devices' platform, as `jax.Device.platform` spells it ("cpu", "gpu",
        "cuda", "rocm", "tpu", ...).
      batch_size: images per evaluation batch.
      devices: devices each chunk is sharded over.

    Returns:
      On "cpu": `CPU_CHUNK` candidates per device, whatever the batch. Elsewhere:
      ``min(ACCELERATOR_CHUNK, ACCELERATOR_MAX_IMAGES // batch_size)`` (at least 1), rounded
      up to a multiple of `devices`.
    """
    if batch_size < 1 or devices < 1:
        raise ValueError(f"batch_size and devices must be >= 1, got {batch_size}, {devices}.")
    if platform.lower() == "cpu":
        return CPU_CHUNK * devices
    chunk = max(1, min(ACCELERATOR_CHUNK, ACCELERATOR_MAX_IMAGES // batch_size))
    return -(-chunk // devices) * devices


def _chunks(
    stack: Mapping[str, np.ndarray], count: int, chunk_size: int, mesh: Mesh | None
) -> list[dict[str, jax.Array]]:
    """The candidates in chunks of `chunk_size`, the last padded with copies of the last one
    so every call has the same shape (and compiles once)."""
    chunks = []
    for k in range(-(-count // chunk_size)):
        rows = np.minimum(np.arange(k * chunk_size, (k + 1) * chunk_size), count - 1)
        chunk = {n: jnp.asarray(m[rows]) for n, m in stack.items()}
        if mesh is not None:
            chunk = jax.device_put(chunk, NamedSharding(mesh, P("data")))
        chunks.append(chunk)
    return chunks


def population_fitness(
    chunk_fn: ChunkFn,
    variables: Any,
    mask_stack: Mapping[str, np.ndarray],
    batches: Iterable[Mapping[str, Any]],
    *,
    chunk_size: int = 0,
    mesh: Mesh | None = None,
    deduplicate: bool = True,
) -> PopulationFitness:
    """Accuracy and mean loss of every candidate on the same batches.

    Args:
      chunk_fn: from `make_chunk_fn`.
      variables: the unpruned model's variables.
      mask_stack: per group, (population, group size) masks; groups left out are not gated.
      batches: evaluation batches ``{"image", "label"}``, iterated once.
      chunk_size: candidates per compiled call (rounded up to a multiple of the devices);
        0: `auto_chunk_size` for the devices' platform and the first batch's size.
      mesh: shard each chunk's candidates over this mesh's devices (None: one device).
      deduplicate: evaluate identical candidates once.

    Returns:
      `PopulationFitness` with one accuracy and loss per candidate of `mask_stack`.
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 1, or 0 for automatic; got {chunk_size}.")
    if not mask_stack:
        raise ValueError("mask_stack is empty: give each candidate's masks of at least one group.")
    sizes = {np.shape(m)[0] for m in mask_stack.values()}
    if len(sizes) != 1:
        raise ValueError(f"Mask stacks disagree on the number of candidates: {sorted(sizes)}.")
    population = sizes.pop()
    if deduplicate:
        stack, inverse = unique_candidates(mask_stack)
    else:
        stack = {n: np.asarray(m, np.float32) for n, m in mask_stack.items()}
        inverse = np.arange(population)
    count = next(iter(stack.values())).shape[0]
    devices = 1 if mesh is None else mesh.size
    sharded = mesh is not None and devices > 1
    if sharded:
        variables = jax.device_put(variables, NamedSharding(mesh, P()))
    chunks: list[dict[str, jax.Array]] = []
    correct = loss = np.zeros(0)
    seen = 0
    for batch in batches:
        images, labels = batch_arrays(batch)
        if not chunks:  # the first batch: its size resolves an automatic chunk size
            if chunk_size == 0:
                platform = (jax.devices() if mesh is None else mesh.devices.flat)[0].platform
                chunk_size = auto_chunk_size(platform, int(labels.shape[0]), devices=devices)
            chunk_size = -(-chunk_size // devices) * devices
            chunks = _chunks(stack, count, chunk_size, mesh if sharded else None)
            correct = np.zeros(len(chunks) * chunk_size, np.float64)
            loss = np.zeros(len(chunks) * chunk_size, np.float64)
        if sharded:
            images, labels = jax.device_put((images, labels), NamedSharding(mesh, P()))
        # Per batch and chunk on device; summed on the host in a fixed order (reproducible).
        for k, chunk in enumerate(chunks):
            hits, losses = to_host(chunk_fn(variables, chunk, images, labels))
            part = slice(k * chunk_size, (k + 1) * chunk_size)
            correct[part] += np.asarray(hits, np.float64)
            loss[part] += np.asarray(losses, np.float64)
        seen += int(labels.shape[0])
    if seen == 0:
        raise ValueError("No evaluation batches: pass at least one {'image', 'label'} batch.")
    return PopulationFitness(
        accuracy=correct[:count][inverse] / seen,
        loss=loss[:count][inverse] / seen,
        evaluated=int(count),
    )
