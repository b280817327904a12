"""The weights of each kernel of a conv group: its 3-D filter, one (kh, kw) slice per input."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxprune.graph import ChannelGraph
from jaxprune.tree_paths import path_of


def kernel_filters(variables: Any, graph: ChannelGraph, group: str) -> np.ndarray:
    """Each kernel's filter of a conv group, from the layer that produces the group.

    For a group with several producers (a residual add, a depthwise conv tied to its input)
    the filters are those of the group's first producer, the layer it is named after.

    Args:
      variables: the model variables.
      graph: their channel graph.
      group: a conv group's name.

    Returns:
      float32 (num_kernels, kh, kw, in_channels_per_group): entry k is kernel k's filter.

    Raises:
      ValueError: a dense group, or a group whose producer has no (kh, kw, in, out) kernel.
    """
    channels = graph[group]
    if channels.kind != "conv":
        raise ValueError(f"Group {group!r} is a dense layer; only conv groups have filters.")
    leaves = {path_of(keys): leaf for keys, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    wanted = ("params", *channels.name.split("/"), "kernel")
    for member in channels.members:
        kernel = leaves.get(member.path)
        if (
            kernel is not None
            and member.path in (wanted, wanted[1:])
            and np.ndim(kernel) == 4
            and member.axis == 3
            and member.channel_of_index is None
        ):
            return np.moveaxis(np.asarray(kernel, np.float32), 3, 0)
    raise ValueError(
        f"Group {group!r}: no 4-D conv kernel at {'/'.join(wanted)} with the kernels on its last "
        "axis; kernel_filters reads flax-style (kh, kw, in, out) conv kernels."
    )
