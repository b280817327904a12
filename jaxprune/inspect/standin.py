"""The scripted stand-in for the person at the kernel page, on the page's activation maps.

The rule itself (`removals_from_maps`, dead kernels first, then duplicates) and its label live
in `jaxprune.methods.standin`, where a progressive run with ``criterion="standin"`` uses them
(methods do not import the inspect layer); they are re-exported here. This module applies the
rule to the maps the page shows (`jaxprune.inspect.maps.activation_maps`) and writes the
choice as a selection document, ``"chosen_by": "stand-in:dead-then-duplicate"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxprune.graph import ChannelGraph
from jaxprune.inspect.maps import activation_maps
from jaxprune.methods.selection_file import model_fingerprint, selection_document
from jaxprune.methods.standin import CHOSEN_BY, DEAD_FRACTION, RULE, removals_from_maps

__all__ = [
    "CHOSEN_BY",
    "DEAD_FRACTION",
    "RULE",
    "removals_from_maps",
    "standin_removals",
    "standin_selection",
]


def standin_removals(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    count: int,
    *,
    dead_fraction: float = DEAD_FRACTION,
) -> np.ndarray:
    """The kernels a scripted stand-in for the person removes from one conv layer.

    A stand-in, not the human criterion: see `jaxprune.methods.standin` for the rule.

    Args:
      apply_fn: the model function the graph was built from.
      variables: the model variables.
      graph: the channel graph.
      group: the conv group.
      images: float32 NHWC sample images (those the page would show).
      count: how many kernels to remove, in [0, number of kernels).
      dead_fraction: the peak, as a fraction of the layer's median peak, under which a kernel
        counts as dead.

    Returns:
      Exactly `count` kernel indices, sorted (int64).

    Raises:
      ValueError: a count out of range, a bad dead_fraction, or a dense group.
    """
    maps = activation_maps(apply_fn, variables, graph, group, images)
    return removals_from_maps(maps, count, dead_fraction=dead_fraction)


def standin_selection(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    count: int,
    *,
    dead_fraction: float = DEAD_FRACTION,
) -> dict[str, Any]:
    """`standin_removals` as a selection document, ``"chosen_by": "stand-in:<rule>"``.

    Args:
      apply_fn, variables, graph, group, images, count, dead_fraction: as for
        `standin_removals`.

    Returns:
      The document (`jaxprune.inspect.selection.write_selection` writes it), with the
      fingerprint of `variables` so that it is refused for another model.
    """
    removals = standin_removals(
        apply_fn, variables, graph, group, images, count, dead_fraction=dead_fraction
    )
    return selection_document(
        {group: removals.tolist()},
        {group: graph[group].size},
        chosen_by=CHOSEN_BY,
        model_fingerprint=model_fingerprint(variables),
    )
