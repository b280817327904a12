"""Where a channel group's numbers live: its producer kernels, its BatchNorm parameters, and
the per-channel view of its activations at the gate points.

Every criterion reads groups through these helpers, so they all agree on what "the weights of
channel c" or "the activation of channel c" means, whatever the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import ChannelGraph, ChannelGroup, GatePoint, layer_name
from jaxprune.tree_paths import Path, path_of


def leaf_at(variables: Any, path: Path) -> Any:
    """The variable leaf at a tree path such as ("params", "conv1", "kernel")."""
    node = variables
    for key in path:
        node = node[key]
    return node


def replace_leaves(variables: Any, new_leaves: Mapping[Path, Any]) -> Any:
    """A copy of `variables` with the leaves at the given paths replaced (nothing mutated)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: new_leaves.get(path_of(p), leaf), variables
    )


def producer_kernel_paths(group: ChannelGroup) -> list[tuple[Path, int]]:
    """(path, output axis) of every kernel that produces the group's channels.

    A residual group has several producers; a depthwise conv that keeps the group's channels is
    one of them. The output axis is the kernel's last axis (flax's layout), on which channel c is
    index c. Kernels are found by their layer path, so linen variables (``params/conv1/kernel``)
    and NNX states (``conv1/kernel``) both work.
    """
    kernels = {}
    for member in group.members:
        if member.path[-1] != "kernel" or layer_name(member.path) not in group.producers:
            continue
        # A kernel reading and writing the group (conv(x) + x) holds it on two axes; flax's
        # output axis is the last one.
        if member.path not in kernels or member.axis > kernels[member.path].axis:
            kernels[member.path] = member
    found = []
    for member in kernels.values():
        if member.channel_of_index is not None:
            raise NotImplementedError(
                f"The kernel {'/'.join(member.path)} of group {group.name!r} interleaves "
                "the group's channels with others on its output axis; weight criteria "
                "need one output index per channel."
            )
        found.append((member.path, member.axis))
    if not found:
        raise ValueError(
            f"Group {group.name!r} has no producer kernel among its parameters (producers: "
            f"{list(group.producers)}); weight criteria need <layer>/kernel leaves."
        )
    return found


def channel_rows(variables: Any, group: ChannelGroup) -> jax.Array:
    """One row of weights per channel: the producer kernels' slices, concatenated.

    For a plain conv layer, row c is the flattened 3-D filter W[..., c]. For a group with several
    producers (a residual stage, a conv followed by a depthwise conv), the slices of all producer
    kernels are laid end to end, so a norm of the row is the norm of everything that produces
    channel c.

    Returns:
      An array of shape (group.size, total weights per channel).
    """
    rows = []
    for path, axis in producer_kernel_paths(group):
        kernel = jnp.asarray(leaf_at(variables, path))
        rows.append(jnp.moveaxis(kernel, axis, 0).reshape(group.size, -1))
    return jnp.concatenate(rows, axis=1)


def batch_norm_members(
    graph: ChannelGraph, group: ChannelGroup, which: str
) -> list[tuple[Path, np.ndarray | None]]:
    """The group's BatchNorm scales (`which="scale"`) or shifts (`"bias"`), with the positions
    of the group's channels in each (None: position c is channel c).

    A BatchNorm layer is a module holding `which` and running statistics ("mean", "var"); a
    LayerNorm or GroupNorm (no running statistics) or a conv bias is not one. A BatchNorm after a
    concatenation holds several groups' channels: the positions pick this group's. A group with
    several BatchNorm layers (a residual stage) returns all of them; one without, an empty list.
    """
    if which not in ("scale", "bias"):
        raise ValueError(f"which must be 'scale' or 'bias', got {which!r}.")
    with_stats = {layer_name(p) for p in graph.variable_shapes if p[-1] in ("mean", "var")}
    found = []
    for member in group.members:
        path = member.path
        if path[-1] != which or path[0] == "batch_stats" or layer_name(path) not in with_stats:
            continue
        owner = member.channel_of_index
        if owner is None:
            found.append((path, None))
            continue
        positions = [np.flatnonzero(np.asarray(owner) == c) for c in range(group.size)]
        if any(p.size != 1 for p in positions):
            continue  # not one position per channel: not a per-channel BatchNorm of this group
        found.append((path, np.array([int(p[0]) for p in positions])))
    return sorted(found, key=lambda item: item[0])


def batch_norm_values(variables: Any, members: list[tuple[Path, np.ndarray | None]]) -> list:
    """The BatchNorm vectors of `batch_norm_members`, each reduced to the group's channels."""
    values = []
    for path, positions in members:
        value = leaf_at(variables, path)
        values.append(value if positions is None else jnp.take(value, jnp.asarray(positions)))
    return values


def channel_view(value: jax.Array, point: GatePoint, group_size: int) -> jax.Array:
    """A gate point's value with the batch first, spatial axes next and channels last.

    Args:
      value: the array captured at the gate point (batch on axis 0).
      point: its gate point.
      group_size: the group's number of channels.

    Returns:
      An array (batch, *spatial, group_size); a point where the group's channels are laid
      among other channels (a concatenation) is gathered so index c is channel c.

    Raises:
      NotImplementedError: the point holds the channels on the batch axis, or interleaves them
        so that a channel owns several indices of its axis.
    """
    if point.axis == 0:
        raise NotImplementedError(
            f"Group {point.group!r} is gated on axis 0 of a value of shape {point.shape}; "
            "activation criteria read axis 0 as the batch."
        )
    view = jnp.moveaxis(value, point.axis, -1)
    owner = point.channel_of_index
    if owner is None:
        return view
    owner = np.asarray(owner)
    positions = [np.flatnonzero(owner == c) for c in range(group_size)]
    if any(p.size != 1 for p in positions):
        raise NotImplementedError(
            f"Group {point.group!r} is read at a value (shape {point.shape}) where a channel "
            "owns several positions of the channel axis; activation criteria need one position "
            "per channel there. Gate the model before the flatten, or use a weight criterion."
        )
    return jnp.take(view, jnp.asarray([int(p[0]) for p in positions]), axis=-1)


def spatial_axes(view: jax.Array) -> tuple[int, ...]:
    """The axes between the batch and the channels of a `channel_view`."""
    return tuple(range(1, view.ndim - 1))


def masked_channels(masks: Mapping[str, Any] | None, name: str) -> np.ndarray | None:
    """A boolean vector of the group's removed channels (mask 0), or None if unmasked."""
    if masks is None or name not in masks:
        return None
    return np.asarray(masks[name]) == 0
