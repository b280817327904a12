"""Pure functions on ``{group: scores}``: normalisations across layers and FLOPs regularisation.

Scores of different layers live on different scales (a layer's Taylor scores shrink with its
width and depth), so a method that ranks channels across layers normalises first. Entries that
are -inf (channels already removed) stay -inf and are left out of every normalising sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxprune.cost import channel_cost, count
from jaxprune.graph import ChannelGraph

ScoreMap = Mapping[str, Any]


def _per_group(scores: ScoreMap, fn: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Applies `fn` to the finite entries of each group's scores; -inf stays."""
    out = {}
    for name, values in scores.items():
        s = np.asarray(values, np.float64).copy()
        if np.isnan(s).any() or np.isposinf(s).any():
            raise ValueError(f"Scores of group {name!r} contain NaN or +inf; fix the criterion.")
        finite = np.isfinite(s)
        if finite.any():
            s[finite] = fn(s[finite])
        out[name] = s
    return out


def normalize_l2(scores: ScoreMap) -> dict[str, np.ndarray]:
    """Per-layer L2 normalisation (Molchanov et al., ICLR 2017): ``s / sqrt(sum_c s_c^2)``.

    A group whose scores are all zero is returned unchanged.

    Args:
      scores: per group, one score per channel.

    Returns:
      The normalised scores.
    """

    def fn(s: np.ndarray) -> np.ndarray:
        norm = np.sqrt(np.sum(s**2))
        return s / norm if norm > 0 else s

    return _per_group(scores, fn)


def normalize_max(scores: ScoreMap) -> dict[str, np.ndarray]:
    """Per-layer max normalisation: ``s / max_c |s_c|`` (all-zero groups unchanged).

    Args:
      scores: per group, one score per channel.

    Returns:
      The normalised scores, in [-1, 1].
    """

    def fn(s: np.ndarray) -> np.ndarray:
        peak = np.max(np.abs(s))
        return s / peak if peak > 0 else s

    return _per_group(scores, fn)


def normalize_rank(scores: ScoreMap) -> dict[str, np.ndarray]:
    """Per-layer rank normalisation: the channel's rank among its group, scaled to [0, 1].

    The lowest score gets 0 and the highest 1: ``rank_c / (n - 1)`` with ranks 0..n-1 over the
    n finite scores; tied scores share the mean of their ranks; a lone channel gets 1.

    Args:
      scores: per group, one score per channel.

    Returns:
      The rank-normalised scores.
    """

    def fn(s: np.ndarray) -> np.ndarray:
        if s.size == 1:
            return np.ones(1)
        order = np.argsort(s, kind="stable")
        ranks = np.empty(s.size)
        ranks[order] = np.arange(s.size, dtype=np.float64)
        _, tie, counts = np.unique(s, return_inverse=True, return_counts=True)
        mean_rank = np.bincount(tie, weights=ranks) / counts
        return mean_rank[tie] / (s.size - 1)

    return _per_group(scores, fn)


def flops_per_channel(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    x: Any,
    **kwargs: Any,
) -> dict[str, float]:
    """The FLOPs one channel of each group costs, per example, in MFLOPs (10^6 FLOPs).

    ``cost_g = sum_{p in producers} F_p / out_p + sum_{q in consumers} F_q * k_q / in_q``, with
    F the layer's FLOPs (`jaxprune.cost.count`, Molchanov et al.'s convention), out_p its
    output channels, in_q its input channels (features) and k_q how many of them one channel of
    the group feeds (1 for a conv, H * W for a dense layer after a flatten). A layer that both
    produces and consumes the group (a depthwise conv) is counted once, as a producer.
    Element-wise work (BatchNorm, activations) is not counted.

    Args:
      apply_fn: the model function; graph: its channel graph; variables: arrays or
        `jax.ShapeDtypeStruct`s; x: an example input (its shape matters).
      **kwargs: passed to `apply_fn` (e.g. ``train=False``).

    Returns:
      Per group, the cost of one channel in MFLOPs per example.
    """
    report = count(apply_fn, variables, x, **kwargs)
    return {group.name: channel_cost(report, group, "flops") / 1e6 for group in graph.groups}


def flops_regularize(
    scores: ScoreMap,
    cost_per_channel: Mapping[str, Any],
    *,
    strength: float = 1e-3,
) -> dict[str, np.ndarray]:
    """FLOPs regularisation (Molchanov et al., ICLR 2017): ``s_c - strength * cost_c``.

    The paper uses strength (lambda) 1e-3 on L2-normalised scores; it does not state the FLOPs
    unit, and `flops_per_channel` gives MFLOPs, so the default penalty is modest.

    Args:
      scores: per group, one score per channel (normalise first).
      cost_per_channel: per group, the cost of one channel (a number, or one per channel),
        e.g. `flops_per_channel(...)`.
      strength: lambda.

    Returns:
      The regularised scores (-inf entries stay -inf).

    Raises:
      ValueError: a group of `scores` has no cost.
    """
    missing = sorted(set(scores) - set(cost_per_channel))
    if missing:
        raise ValueError(
            f"No FLOPs cost for groups {missing}; pass cost_per_channel for every scored group "
            "(flops_per_channel(apply_fn, graph, variables, x) computes them)."
        )
    out = {}
    for name, values in scores.items():
        s = np.asarray(values, np.float64)
        cost = np.broadcast_to(np.asarray(cost_per_channel[name], np.float64), s.shape)
        out[name] = np.where(np.isneginf(s), -np.inf, s - strength * cost)
    return out
