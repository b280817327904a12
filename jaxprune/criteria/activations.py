"""Criteria on the activations at the gate points: mean, spread, sparsity, entropy, rank, and
information about the label.

The activation of channel c is read at its group's gate point, where its consumers read it:
after every per-channel operation between the convolution and the next layer, so after
normalisation and the nonlinearity, and after pooling whenever a pooling layer comes before the
consumer. On VGG-small, conv1/3/5 are read at full resolution after BN + ReLU, and conv2/4/6
after BN + ReLU + 2x2 max-pooling (14x14, 7x7 and 3x3 maps), since the next convolution (or the
flatten) reads the pooled map. ``a[n, *p, c]`` is the value for example n and spatial position
p there (`layout.channel_view`). A group read at several gate points (a residual
stage) gets each score computed per point and averaged over the points.

Every statistic is accumulated over batches in float64; the ones that are sums (mean, std,
APoZ, HRank) give the same scores for any split of the data into batches, and entropy and
mutual information keep every pooled value, so they do too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.criteria.base import (
    Batch,
    Criterion,
    Masks,
    Scores,
    ScoringContext,
    batch_arrays,
)
from jaxprune.criteria.layout import channel_view, spatial_axes
from jaxprune.gates import gate_points, gated_call
from jaxprune.sharding import to_host


def _views(context: ScoringContext, variables: Any, image: jax.Array, masks: Masks | None):
    """Per group, the channel views (batch, *spatial, channels) of its gate points."""
    _, captured = gated_call(
        context.apply_fn,
        context.graph,
        variables,
        image,
        masks,
        capture=True,
        **context.apply_kwargs,
    )
    points = gate_points(context.apply_fn, context.graph, variables, image, **context.apply_kwargs)
    return {
        group.name: [
            channel_view(value, point, group.size)
            for value, point in zip(captured[group.name], points[group.name], strict=True)
        ]
        for group in context.graph.groups
    }


@functools.partial(jax.jit, static_argnames=("context", "kind"))
def _batch_summary(
    context: ScoringContext, variables: Any, image: jax.Array, masks: Masks | None, kind: str
) -> dict[str, list[dict[str, jax.Array]]]:
    """One batch's statistics per group and gate point; `kind` says which."""
    out = {}
    for name, views in _views(context, variables, image, masks).items():
        stats = []
        for view in views:
            values = view.reshape(-1, view.shape[-1])  # (examples * positions, channels)
            count = jnp.asarray(values.shape[0], jnp.float32)
            if kind == "moments":
                mean = values.mean(0)
                stats.append({"count": count, "mean": mean, "m2": ((values - mean) ** 2).sum(0)})
            elif kind == "zeros":
                stats.append(
                    {
                        "count": count,
                        "zeros": (values == 0).sum(0).astype(jnp.float32),
                        "negatives": (values < 0).sum().astype(jnp.float32),
                    }
                )
            elif kind == "rank":
                if view.ndim != 4:  # only (batch, height, width, channels) maps have a rank
                    stats.append({})
                    continue
                maps = jnp.moveaxis(view, -1, 1)  # (batch, channels, height, width)
                ranks = jnp.linalg.matrix_rank(maps).astype(jnp.float32)
                stats.append(
                    {"count": jnp.asarray(view.shape[0], jnp.float32), "rank": ranks.sum(0)}
                )
            elif kind == "pooled":
                stats.append({"pooled": view.mean(axis=spatial_axes(view))})
            else:
                raise ValueError(f"unknown activation summary {kind!r}")
        out[name] = stats
    return out


def _merge_moments(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict:
    """Chan et al.'s parallel update of (count, mean, sum of squared deviations)."""
    b = {k: np.asarray(v, np.float64) for k, v in to_host(b).items()}
    if a is None:
        return b
    count = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    return {
        "count": count,
        "mean": a["mean"] + delta * b["count"] / count,
        "m2": a["m2"] + b["m2"] + delta**2 * a["count"] * b["count"] / count,
    }


def _add(a: dict[str, np.ndarray] | None, b: dict[str, Any]) -> dict:
    b = {k: np.asarray(v, np.float64) for k, v in to_host(b).items()}
    return b if a is None else {k: a[k] + b[k] for k in b}


def _append(a: dict[str, list] | None, b: dict[str, Any]) -> dict:
    a = a or {k: [] for k in b}
    # Per-example values: rows held by other processes' devices are gathered.
    return {k: a[k] + [np.asarray(v, np.float64)] for k, v in to_host(b).items()}


def _summary_criterion(
    name: str,
    kind: str,
    merge: Callable[[Any, dict], Any],
    point_score: Callable[[Any, np.ndarray | None], np.ndarray | None],
    needs_labels: bool = False,
) -> Criterion:
    """A criterion that merges per-point batch summaries, scores each point, and averages.

    `point_score(merged, labels)` returns one score per channel, or None when the point does
    not apply (the group is left out if none of its points applies).
    """

    def init(context: ScoringContext, variables: Any, masks: Masks | None) -> dict:
        return {"points": None, "labels": []}

    def update(
        state: dict, context: ScoringContext, variables: Any, batch: Batch, masks: Masks | None
    ) -> dict:
        image, label = batch_arrays(batch)
        summary = _batch_summary(context, variables, image, masks, kind)
        previous = state["points"] or {n: [None] * len(v) for n, v in summary.items()}
        points = {
            n: [
                merge(old, new) if new else old
                for old, new in zip(previous[n], summary[n], strict=True)
            ]
            for n in summary
        }
        labels = state["labels"] + [to_host(label)] if needs_labels else []
        return {"points": points, "labels": labels}

    def finalize(
        state: dict, context: ScoringContext, variables: Any, masks: Masks | None
    ) -> Scores:
        if state["points"] is None:
            raise ValueError(f"Criterion {name!r} needs at least one batch of data.")
        labels = np.concatenate(state["labels"]) if needs_labels else None
        scores = {}
        for group_name, merged in state["points"].items():
            per_point = [point_score(m, labels) for m in merged if m is not None]
            per_point = [s for s in per_point if s is not None]
            if per_point:
                scores[group_name] = np.mean(per_point, axis=0)
        return scores

    return Criterion(name, init, update, finalize)


def activation_mean() -> Criterion:
    """Mean activation (Molchanov et al., ICLR 2017, Theta_MA).

    ``s_c = (1 / (N M)) sum_n sum_p a[n, p, c]`` over all N examples and M spatial positions of
    the data (no absolute value: after a ReLU the activations are non-negative).

    Returns:
      The criterion "activation_mean".
    """
    return _summary_criterion(
        "activation_mean", "moments", _merge_moments, lambda m, labels: m["mean"]
    )


def activation_std() -> Criterion:
    """Standard deviation of the activation (Molchanov et al., ICLR 2017, Theta_MA_std).

    ``s_c = sqrt((1 / (N M)) sum_n sum_p (a[n, p, c] - mu_c)^2)``, mu_c the mean activation,
    over all examples and positions together (so it is defined for dense layers too).

    Returns:
      The criterion "activation_std".
    """
    return _summary_criterion(
        "activation_std",
        "moments",
        _merge_moments,
        lambda m, labels: np.sqrt(m["m2"] / m["count"]),
    )


def apoz() -> Criterion:
    """Average Percentage of Zeros (Hu et al., "Network Trimming", arXiv 1607.03250, 2016).

    ``APoZ_c = (1 / (N M)) sum_n sum_p [a[n, p, c] == 0]`` and ``s_c = 1 - APoZ_c``: a channel
    that is mostly zero after its ReLU is the least relevant. APoZ is defined on rectified
    activations: a gate point where any activation is negative (no ReLU there, e.g. after a
    GELU or a LayerNorm) does not count, and a group with no rectified point is left out of
    the result (it would otherwise score 1 for every channel).

    Returns:
      The criterion "apoz".
    """

    def point_score(merged: dict, labels: Any) -> np.ndarray | None:
        if merged["negatives"] > 0:
            return None
        return 1.0 - merged["zeros"] / merged["count"]

    return _summary_criterion("apoz", "zeros", _add, point_score)


def hrank() -> Criterion:
    """Average rank of the feature maps (Lin et al., "HRank", CVPR 2020).

    ``s_c = (1 / N) sum_n rank(A[n, :, :, c])``, the matrix rank (`jnp.linalg.matrix_rank`,
    default tolerance) of example n's (H, W) map. Only gate points with two spatial axes have
    maps; groups read only as vectors (dense layers) are left out of the result.

    Returns:
      The criterion "hrank".
    """
    return _summary_criterion("hrank", "rank", _add, lambda m, labels: m["rank"] / m["count"])


def _quantise(pooled: np.ndarray, bins: int) -> np.ndarray:
    """Bin index (0..bins-1) of each value, with `bins` equal-width bins per channel spanning
    that channel's [min, max] over the data; a constant channel falls in bin 0."""
    low, high = pooled.min(0), pooled.max(0)
    width = np.where(high > low, high - low, 1.0)
    index = np.floor((pooled - low) / width * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1)


def _check_bins(bins: int) -> None:
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}.")


def _entropy_of_point(bins: int) -> Callable[[dict, Any], np.ndarray]:
    def score(merged: dict, labels: Any) -> np.ndarray:
        index = _quantise(np.concatenate(merged["pooled"]), bins)
        counts = np.stack([np.bincount(index[:, c], minlength=bins) for c in range(index.shape[1])])
        p = counts / counts.sum(1, keepdims=True)
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)

    return score


def entropy(*, bins: int = 16) -> Criterion:
    """Entropy of the pooled activation (Luo and Wu, "An Entropy-based Pruning Method for CNN
    Compression", arXiv 1706.05791, 2017).

    Each example's map of channel c is global-average-pooled to one value ``g[n, c]``. Over all
    N examples these values fall into `bins` equal-width bins spanning the channel's own
    [min, max]; with p_i the fraction in bin i, ``s_c = -sum_i p_i log p_i`` (nats). A channel
    whose response hardly varies carries little information.

    Args:
      bins: the number of bins per channel (>= 2).

    Returns:
      The criterion "entropy".
    """
    _check_bins(bins)
    return _summary_criterion("entropy", "pooled", _append, _entropy_of_point(bins))


def _information_of_point(bins: int) -> Callable[[dict, Any], np.ndarray]:
    def score(merged: dict, labels: np.ndarray) -> np.ndarray:
        index = _quantise(np.concatenate(merged["pooled"]), bins)
        classes, label_index = np.unique(labels, return_inverse=True)
        n = index.shape[0]
        scores = np.zeros(index.shape[1])
        for c in range(index.shape[1]):
            joint = np.zeros((bins, classes.size))
            np.add.at(joint, (index[:, c], label_index), 1.0)
            joint /= n
            outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
            nonzero = joint > 0
            scores[c] = np.sum(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero]))
        return scores

    return score


def mutual_info(*, bins: int = 16) -> Criterion:
    """Mutual information between the quantised activation and the label (Molchanov et al.,
    ICLR 2017, Theta_MI, computed as information gain on quantised values).

    ``g[n, c]`` is the global-average-pooled activation, quantised into `bins` equal-width bins
    over the channel's [min, max] (as for `entropy`); with y the label,
    ``s_c = sum_{q, y} p(q, y) log(p(q, y) / (p(q) p(y)))`` (nats), over all examples.

    Args:
      bins: the number of bins per channel (>= 2).

    Returns:
      The criterion "mutual_info".
    """
    _check_bins(bins)
    return _summary_criterion(
        "mutual_info", "pooled", _append, _information_of_point(bins), needs_labels=True
    )
