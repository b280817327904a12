"""One-shot pruning: rank channels once by a criterion and keep the best of each group.

The baselines of the four papers (L1 of Li et al. 2017, APoZ of Hu et al. 2016, FPGM, Network
Slimming, HRank, entropy, Taylor-FO, random) are one-shot: score every channel, remove the lowest
fraction, optionally fine-tune. This module turns scores into keep indices; scoring lives in
`jaxprune.criteria` and removal in `jaxprune.surgery`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxprune import criteria
from jaxprune.graph import ChannelGraph
from jaxprune.surgery import Pruned, prune


@dataclasses.dataclass(frozen=True)
class OneShotConfig:
    """How many channels to remove, and where."""

    # Fraction of each selected group's channels to remove (per-layer mode) or of all selected
    # channels together (global mode).
    ratio: float = 0.5
    # "conv": only groups produced by convolutions; "all": dense hidden layers too.
    scope: str = "conv"
    # "per_layer": remove `ratio` of every group; "global": rank all channels together (scores
    # should be normalised per layer first, e.g. criteria transforms' l2 normalisation).
    ranking: str = "per_layer"
    # Never leave a group with fewer channels than this.
    min_channels: int = 1


def select_groups(graph: ChannelGraph, scope: str) -> list[str]:
    """The names of the groups a method may prune under `scope` ("conv" or "all")."""
    if scope not in ("conv", "all"):
        raise ValueError(f"scope must be 'conv' or 'all', got {scope!r}.")
    return [g.name for g in graph.groups if scope == "all" or g.kind == "conv"]


def keep_from_scores(
    graph: ChannelGraph, scores: Mapping[str, np.ndarray], config: OneShotConfig
) -> dict[str, np.ndarray]:
    """Keeps the highest-scoring channels of every selected group.

    Args:
      graph: the channel graph.
      scores: per group, one score per channel (higher = more relevant); groups missing here
        are not pruned.
      config: the ratio, scope and ranking.

    Returns:
      Sorted keep indices for every pruned group.
    """
    if not 0.0 <= config.ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {config.ratio}: it is the part removed.")
    names = [n for n in select_groups(graph, config.scope) if n in scores]
    for name in names:
        if np.shape(scores[name]) != (graph[name].size,):
            raise ValueError(
                f"scores[{name!r}] has shape {np.shape(scores[name])}; the group has "
                f"{graph[name].size} channels."
            )
    if config.ranking == "per_layer":
        keep = {}
        for name in names:
            size = graph[name].size
            n_keep = max(config.min_channels, size - int(round(config.ratio * size)))
            keep[name] = _top(scores[name], min(size, n_keep))
        return keep
    if config.ranking != "global":
        raise ValueError(f"ranking must be 'per_layer' or 'global', got {config.ranking!r}.")
    flat = [(float(s), name, i) for name in names for i, s in enumerate(np.asarray(scores[name]))]
    n_remove = int(round(config.ratio * len(flat)))
    removed: dict[str, set[int]] = {name: set() for name in names}
    # Lowest first (stable on ties); a group at its minimum is skipped, not counted.
    count = 0
    for _, name, i in sorted(flat, key=lambda t: t[0]):
        if count == n_remove:
            break
        if graph[name].size - len(removed[name]) > config.min_channels:
            removed[name].add(i)
            count += 1
    return {
        name: np.array(sorted(set(range(graph[name].size)) - removed[name]), dtype=np.int64)
        for name in names
    }


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, sorted; ties go to the lower index."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def oneshot_prune(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    batches: Iterable[Mapping[str, Any]] | None,
    *,
    criterion: str = "l1",
    config: OneShotConfig = OneShotConfig(),
    seed: int = 0,
) -> Pruned:
    """Scores every channel once, keeps the best of each group, and removes the rest.

    Args:
      apply_fn: the model function the graph was built from.
      graph: its channel graph.
      variables: the trained variables.
      batches: preprocessed validation batches for data-driven criteria (None for weight
        criteria); never the test split.
      criterion: a registered criterion name (`jaxprune.criteria.CRITERIA`).
      config: ratio, scope and ranking; a global ranking compares L2-normalised scores
        (Molchanov et al. 2017's per-layer normalisation).
      seed: the seed of the random criterion.

    Returns:
      `surgery.Pruned`: the smaller variables, the new width spec and the keep indices.
    """
    context = criteria.ScoringContext(apply_fn=apply_fn, graph=graph)
    options = {"seed": seed} if criterion == "random" else {}
    scores = criteria.score(criterion, context, variables, batches, **options)
    if config.ranking == "global":
        scores = criteria.normalize_l2(scores)
    return prune(variables, graph, keep_from_scores(graph, scores, config))
