"""Activation maps: what each kernel of a conv layer outputs, image by image.

A kernel's map is its channel of the group's gate point, the value where the next layers read
it (after BatchNorm and the nonlinearity, and after a pooling that comes before any consumer).
That is what removing the kernel takes away, so it is what a person judging the kernel should
look at. The maps come from `jaxprune.gates.gated_call` with ``capture=True``: the model's code
is not touched and any `apply_fn` works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.gates import gate_points, gated_call
from jaxprune.graph import ChannelGraph, GatePoint, GraphError


def activation_maps(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    **apply_kwargs: Any,
) -> np.ndarray:
    """Every kernel's activation map of one conv group, for a batch of images.

    Args:
      apply_fn: the model function the graph was built from.
      variables: the model variables (the graph's widths).
      graph: the channel graph (`jaxprune.graph.channel_graph`).
      group: a conv group's name, e.g. "conv1".
      images: float32 NHWC images, as the model takes them.
      **apply_kwargs: passed to `apply_fn`; default ``train=False`` (eval-mode BatchNorm).

    Returns:
      float32 array (num_images, H, W, num_kernels): channel k is kernel k's map. A group
      whose channels are read only after a global pooling has 1x1 maps.

    Raises:
      ValueError: a dense group (it has no maps), or images that are not a batch of NHWC
        images; GraphError: an unknown group.
    """
    return all_activation_maps(apply_fn, variables, graph, images, [group], **apply_kwargs)[group]


def all_activation_maps(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    images: Any,
    groups: Sequence[str] | None = None,
    **apply_kwargs: Any,
) -> dict[str, np.ndarray]:
    """The activation maps of several conv groups from one model call (see `activation_maps`).

    Args:
      apply_fn: the model function; variables: its variables; graph: its channel graph.
      images: float32 NHWC images.
      groups: conv group names; None: every conv group.
      **apply_kwargs: passed to `apply_fn`; default ``train=False``.

    Returns:
      Per group, float32 (num_images, H, W, num_kernels).

    Raises:
      ValueError: a dense group or bad images; GraphError: an unknown group.
    """
    names = [g.name for g in graph.groups if g.kind == "conv"] if groups is None else list(groups)
    for name in names:
        if graph[name].kind != "conv":
            raise ValueError(
                f"Group {name!r} is a dense layer: its units have no spatial activation maps. "
                f"Pick a conv group: {[g.name for g in graph.groups if g.kind == 'conv']}."
            )
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(
            f"images must be a batch of NHWC images, shape (N, H, W, C) with N >= 1; got "
            f"{tuple(images.shape)}. Add a batch axis with images[None] for one image."
        )
    kwargs = {"train": False, **apply_kwargs}
    _, captured = _captured(apply_fn, graph, variables, images, kwargs)
    points = gate_points(apply_fn, graph, variables, images, **kwargs)
    maps = {}
    for name in names:
        index, point = _map_point(name, points[name])
        maps[name] = _channel_maps(np.asarray(captured[name][index]), point, graph[name].size)
    return maps


def _captured(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    images: jax.Array,
    kwargs: dict[str, Any],
) -> Any:
    # One jitted call: the interpreter's many small ops would otherwise dispatch one by one.
    def run(variables, images):
        return gated_call(apply_fn, graph, variables, images, capture=True, **kwargs)

    return jax.jit(run)(variables, images)


def _map_point(name: str, points: Sequence[GatePoint]) -> tuple[int, GatePoint]:
    """The gate point whose maps show the most: the largest spatial NHWC value."""
    spatial = [
        (int(np.prod(p.shape[1:3])), -k, k, p)
        for k, p in enumerate(points)
        if len(p.shape) == 4 and p.axis == 3
    ]
    if spatial:
        _, _, index, point = max(spatial)
        return index, point
    flat = [(k, p) for k, p in enumerate(points) if len(p.shape) == 2 and p.axis == 1]
    if flat:
        return flat[0]
    shapes = [(p.shape, p.axis) for p in points]
    raise ValueError(
        f"Group {name!r} is read only in layouts without an (N, H, W, C) or (N, C) form "
        f"(shape, channel axis: {shapes}); activation maps need one of those."
    )


def _channel_maps(value: np.ndarray, point: GatePoint, size: int) -> np.ndarray:
    """(N, H, W, size) maps from a gate value, picking the group's channels out of the axis."""
    if value.ndim == 2:
        value = value[:, None, None, :]
    if point.channel_of_index is not None:
        owner = np.asarray(point.channel_of_index)
        positions = np.array([np.flatnonzero(owner == c) for c in range(size)], dtype=object)
        if any(len(p) != 1 for p in positions):
            raise GraphError(
                f"Group {point.group!r}: a channel appears {sorted({len(p) for p in positions})} "
                "times along the gated axis; activation maps need each channel exactly once."
            )
        value = value[..., np.concatenate(list(positions)).astype(np.int64)]
    if value.shape[-1] != size:
        raise GraphError(
            f"Group {point.group!r} has {size} channels but its gate value has "
            f"{value.shape[-1]}; rebuild the graph from these variables."
        )
    return np.asarray(value, np.float32)
