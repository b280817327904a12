"""Which channels go: turn per-channel scores into keep indices.

Every method ends with the same choice: given scores (higher = more relevant) for the channels
of the prunable groups, keep the best of each group (per layer) or of all groups together
(global), never leaving a group below a minimum. A group normalised in blocks (GroupNorm) loses
whole blocks: its channels' scores are summed per block and blocks are ranked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxprune.graph import ChannelGraph

SCOPES = ("conv", "all")
RANKINGS = ("per_layer", "global")


@dataclasses.dataclass(frozen=True)
class Selection:
    """How many channels to remove, and where."""

    # Fraction of each selected group's channels to remove (per-layer ranking) or of all
    # selected channels together (global ranking).
    ratio: float = 0.5
    # "conv": only groups produced by convolutions; "all": dense hidden layers too.
    scope: str = "conv"
    # "per_layer": remove `ratio` of every group; "global": rank all channels together (scores
    # should be normalised per layer first, e.g. with criteria.normalize_l2).
    ranking: str = "per_layer"
    # Never leave a group with fewer channels than this.
    min_channels: int = 1


def check_selection(selection: Any) -> None:
    """Raises ValueError naming the first invalid field of a selection (or a config with the
    same fields)."""
    if not 0.0 <= selection.ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {selection.ratio}: it is the part removed.")
    if selection.scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {selection.scope!r}.")
    if selection.ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {selection.ranking!r}.")
    if selection.min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {selection.min_channels}.")


def select_groups(graph: ChannelGraph, scope: str) -> list[str]:
    """The names of the groups a method may prune under `scope` ("conv" or "all")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'conv' or 'all', got {scope!r}.")
    return [g.name for g in graph.groups if scope == "all" or g.kind == "conv"]


def keep_from_scores(
    graph: ChannelGraph, scores: Mapping[str, np.ndarray], selection: Any
) -> dict[str, np.ndarray]:
    """Keeps the highest-scoring channels (or blocks) of every selected group.

    Args:
      graph: the channel graph.
      scores: per group, one score per channel (higher = more relevant); groups missing here
        are not pruned.
      selection: ratio, scope, ranking and min_channels (a `Selection` or a method config
        with those fields).

    Returns:
      Sorted keep indices (whole blocks for block groups) for every pruned group.
    """
    check_selection(selection)
    names = [n for n in select_groups(graph, selection.scope) if n in scores]
    units: dict[str, np.ndarray] = {}  # per group, one score per removable unit (block)
    for name in names:
        group = graph[name]
        values = np.asarray(scores[name], dtype=np.float64)
        if values.shape != (group.size,):
            raise ValueError(
                f"scores[{name!r}] has shape {values.shape}; the group has {group.size} channels."
            )
        units[name] = values.reshape(-1, group.block).sum(1)
    minimum = {n: max(1, -(-selection.min_channels // graph[n].block)) for n in names}
    if selection.ranking == "per_layer":
        kept_units = {}
        for name in names:
            n_units = units[name].size
            n_keep = max(minimum[name], n_units - int(round(selection.ratio * n_units)))
            kept_units[name] = _top(units[name], min(n_units, n_keep))
    else:
        flat = [(float(s), name, i) for name in names for i, s in enumerate(units[name])]
        n_remove = int(round(selection.ratio * len(flat)))
        removed: dict[str, set[int]] = {name: set() for name in names}
        count = 0
        # Lowest first (stable on ties); a group at its minimum is skipped, not counted.
        for _, name, i in sorted(flat, key=lambda t: t[0]):
            if count == n_remove:
                break
            if units[name].size - len(removed[name]) > minimum[name]:
                removed[name].add(i)
                count += 1
        kept_units = {
            name: np.array(sorted(set(range(units[name].size)) - removed[name]), dtype=np.int64)
            for name in names
        }
    keep = {}
    for name, kept in kept_units.items():
        block = graph[name].block
        keep[name] = (kept[:, None] * block + np.arange(block)).reshape(-1).astype(np.int64)
    return keep


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, sorted; ties go to the lower index."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return np.sort(order[:k]).astype(np.int64)
