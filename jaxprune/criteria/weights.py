"""Criteria that read only the weights: norms of filters, distances between filters, BN scales.

The weights of channel c are the row `layout.channel_rows(variables, group)[c]`: the producer
kernels' slices W[..., c], flattened and, for a group with several producers (a residual stage,
a conv followed by a depthwise conv), laid end to end. So each norm below is the norm of
everything that produces channel c; for L1 that is the sum of the per-producer L1 norms.

These criteria ignore the batches. With masks, FPGM and Fermat measure distances to the
surviving filters only (the removed ones are not part of the model any more); `score` then
gives the removed channels -inf.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxprune.criteria.base import Criterion, Masks, Scores, ScoringContext, ignore_batch, no_state
from jaxprune.criteria.layout import (
    batch_norm_members,
    batch_norm_values,
    channel_rows,
    masked_channels,
)


def _rows(variables: Any, group: Any) -> np.ndarray:
    return np.asarray(channel_rows(variables, group), np.float64)


def _weight_criterion(name: str, per_group: Any) -> Criterion:
    def finalize(
        state: None, context: ScoringContext, variables: Any, masks: Masks | None
    ) -> Scores:
        scores = {}
        for group in context.graph.groups:
            value = per_group(variables, context.graph, group, masked_channels(masks, group.name))
            if value is not None:
                scores[group.name] = value
        return scores

    return Criterion(name, no_state, ignore_batch, finalize, uses_batches=False)


def l1_norm() -> Criterion:
    """L1 norm of each filter (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    ``s_c = sum_i |W_c[i]|`` over every weight of the producer kernels' slices for channel c.

    Returns:
      The criterion "l1".
    """
    return _weight_criterion("l1", lambda v, g, group, removed: np.abs(_rows(v, group)).sum(1))


def l2_norm() -> Criterion:
    """L2 norm of each filter: ``s_c = sqrt(sum_i W_c[i]^2)`` (the L2 variant of Li et al. 2017).

    Returns:
      The criterion "l2".
    """
    return _weight_criterion(
        "l2", lambda v, g, group, removed: np.sqrt((_rows(v, group) ** 2).sum(1))
    )


def mean_squared_weight() -> Criterion:
    """Mean squared weight: ``s_c = (1 / |W_c|) sum_i W_c[i]^2``.

    The "minimum weight" criterion of Molchanov et al., "Pruning Convolutional Neural Networks
    for Resource Efficient Inference", ICLR 2017 (Theta_MW). |W_c| is the number of weights
    producing channel c.

    Returns:
      The criterion "min_weight".
    """
    return _weight_criterion(
        "min_weight", lambda v, g, group, removed: (_rows(v, group) ** 2).mean(1)
    )


def _fpgm(variables: Any, graph: Any, group: Any, removed: np.ndarray | None) -> np.ndarray:
    rows = _rows(variables, group)
    alive = np.ones(group.size, bool) if removed is None else ~removed
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b: a Gram matrix instead of a (C, C, D) difference
    # tensor, which would not fit in memory for VGG-16's 512-filter layers.
    squared = (rows**2).sum(1)
    gram = rows @ rows[alive].T
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, alive] - 2 * gram, 0.0))
    return distances.sum(1)


def fpgm() -> Criterion:
    """Filter Pruning via Geometric Median (He et al., CVPR 2019).

    ``s_c = sum_j ||W_c - W_j||_2`` over the filters j of the same group (the surviving ones
    when masks are given). A filter close to all others is near the geometric median: the others
    can stand in for it, so it is the least relevant.

    Returns:
      The criterion "fpgm".
    """
    return _weight_criterion("fpgm", _fpgm)


def geometric_median(
    points: np.ndarray, *, iterations: int = 200, tolerance: float = 1e-10
) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to `points`, by Weiszfeld's method.

    Each step is ``y <- sum_j w_j x_j / sum_j w_j`` with ``w_j = 1 / ||x_j - y||``, starting
    from the mean; a distance below 1e-12 is clamped so a step through a data point stays finite.

    Args:
      points: shape (n, d).
      iterations: the most steps taken.
      tolerance: stop when a step moves y by less than ``tolerance * (1 + ||y||)``.

    Returns:
      The geometric median, shape (d,).
    """
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs points of shape (n >= 1, d), got {points.shape}.")
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / np.maximum(np.linalg.norm(points - median, axis=1), 1e-12)
        new = weights @ points / weights.sum()
        step = np.linalg.norm(new - median)
        median = new
        if step <= tolerance * (1.0 + np.linalg.norm(median)):
            break
    return median


def fermat(*, iterations: int = 200, tolerance: float = 1e-10) -> Criterion:
    """Distance to the layer's Fermat point (geometric median), from the pool of He et al.,
    "Blending Pruning Criteria for Convolutional Neural Networks", ICANN 2021.

    ``s_c = ||W_c - m||_2`` where m minimises ``sum_j ||W_j - m||_2`` over the group's
    (surviving) filters, found by Weiszfeld iterations (`geometric_median`).

    Args:
      iterations: the most Weiszfeld steps.
      tolerance: relative step size at which the iteration stops.

    Returns:
      The criterion "fermat".
    """

    def per_group(variables, graph, group, removed):
        rows = _rows(variables, group)
        alive = np.ones(group.size, bool) if removed is None else ~removed
        median = geometric_median(rows[alive], iterations=iterations, tolerance=tolerance)
        return np.linalg.norm(rows - median, axis=1)

    return _weight_criterion("fermat", per_group)


def _batch_norm_criterion(name: str, which: str) -> Criterion:
    def per_group(variables, graph, group, removed):
        members = batch_norm_members(graph, group, which)
        if not members:
            return None
        values = batch_norm_values(variables, members)
        return sum(np.abs(np.asarray(v, np.float64)) for v in values)

    return _weight_criterion(name, per_group)


def bn_gamma() -> Criterion:
    """BatchNorm scale magnitude (Liu et al., "Learning Efficient Convolutional Networks
    through Network Slimming", ICCV 2017).

    ``s_c = sum_b |gamma_b[c]|`` over the group's BatchNorm layers b (one for a plain conv;
    several in a residual stage). Groups without BatchNorm are left out of the result.

    Returns:
      The criterion "bn_gamma".
    """
    return _batch_norm_criterion("bn_gamma", "scale")


def bn_beta() -> Criterion:
    """BatchNorm shift magnitude: ``s_c = sum_b |beta_b[c]|`` over the group's BatchNorm
    layers (the shift counterpart of Network Slimming's scale criterion). Groups without
    BatchNorm are left out of the result.

    Returns:
      The criterion "bn_beta".
    """
    return _batch_norm_criterion("bn_beta", "bias")
