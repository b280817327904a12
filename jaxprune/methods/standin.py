"""A scripted stand-in for the person at the kernel page: NOT the subjective criterion itself.

Osaku et al.'s subjective criterion is a person looking at each kernel's activation maps. For
automated runs (tests, experiments, CI) this module plays that part with a fixed rule a person
might follow, and labels its choices ``"chosen_by": "stand-in:dead-then-duplicate"`` so a
stand-in's selection is never mistaken for a human one.

The rule, greedy until `count` kernels are chosen:

1. *Dead* kernels first: those whose peak activation over the sample images is zero or below
   ``dead_fraction`` times the layer's typical peak (the median over its kernels), weakest first.
2. Then *duplicates*: among the kernels still kept, the one whose flattened maps have the
   highest correlation (Pearson: cosine similarity after subtracting each kernel's mean) with
   another kept kernel's; of two equally similar kernels the weaker (lower peak) goes, then the
   higher index. Similarities are recomputed among the kept kernels after every removal, so of
   a pair of duplicates one stays.

Why correlation and not plain cosine similarity: post-ReLU maps are non-negative, so any two
kernels that fire at all have a large cosine similarity (two independent uniform maps: about
0.75), highest for kernels with a large constant part. Centring removes that offset, so the
rule picks kernels whose maps vary together (a copy, or a scaled copy, correlates at 1). Maps
of kernels that fire on the same object still correlate somewhat; a constant or empty map
correlates with nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxprune.criteria.layout import channel_view
from jaxprune.gates import gate_points, gated_call
from jaxprune.graph import ChannelGraph

RULE = "dead-then-duplicate"
CHOSEN_BY = f"stand-in:{RULE}"
# A kernel is dead when its peak is below this fraction of the layer's median peak.
DEAD_FRACTION = 0.05


def layer_maps(
    apply_fn: Callable[..., Any],
    variables: Any,
    graph: ChannelGraph,
    group: str,
    images: Any,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Every kernel's activation map of one group at its gate point, for the stand-in.

    The map is the group's value where its consumers read it (after normalisation, the
    nonlinearity and a pooling before any consumer), read at the gate point with the largest
    spatial extent; a group read only as vectors has 1x1 maps. `jaxprune.inspect.maps` draws
    the same values for the page.

    Args:
      apply_fn: the model function the graph was built from.
      variables: its variables.
      graph: its channel graph.
      group: the group.
      images: a batch of inputs.
      apply_kwargs: the evaluation call's keywords (default ``{"train": False}``).

    Returns:
      float32 (num_images, H, W, num_kernels).
    """
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    size = graph[group].size

    def run(variables: Any, images: Any) -> Any:
        return gated_call(apply_fn, graph, variables, images, capture=True, **kwargs)[1][group]

    values = jax.jit(run)(variables, images)
    points = gate_points(apply_fn, graph, variables, images, **kwargs)[group]
    views = [channel_view(v, p, size) for v, p in zip(values, points, strict=True)]
    # The point that shows the most: the largest spatial map (ties: the first).
    view = max(views, key=lambda v: int(np.prod(v.shape[1:-1])))
    view = np.asarray(view, np.float32)
    if view.ndim == 2:
        return view[:, None, None, :]
    return view.reshape(view.shape[0], view.shape[1], -1, size)


def removals_from_maps(
    maps: np.ndarray, count: int, *, dead_fraction: float = DEAD_FRACTION
) -> np.ndarray:
    """The stand-in's rule on activation maps already computed.

    Args:
      maps: (num_images, H, W, num_kernels) activation maps (`activation_maps`).
      count: how many kernels to remove, in [0, num_kernels).
      dead_fraction: see `standin_removals`.

    Returns:
      Exactly `count` kernel indices, sorted (int64).

    Raises:
      ValueError: maps that are not 4-D, a count out of range, or a bad dead_fraction.
    """
    maps = np.asarray(maps, np.float64)
    if maps.ndim != 4:
        raise ValueError(
            f"maps must be (num_images, H, W, num_kernels), got shape {maps.shape}; compute them "
            "with activation_maps."
        )
    num_kernels = maps.shape[-1]
    if not isinstance(count, int | np.integer) or not 0 <= count < num_kernels:
        raise ValueError(
            f"count must be an integer in [0, {num_kernels}) (a layer keeps at least one "
            f"kernel), got {count!r}."
        )
    if not 0.0 <= dead_fraction < 1.0:
        raise ValueError(f"dead_fraction must lie in [0, 1), got {dead_fraction}.")
    vectors = maps.reshape(-1, num_kernels).T  # (num_kernels, images * H * W)
    peaks = np.max(np.abs(vectors), axis=1)
    typical = float(np.median(peaks))
    chosen: list[int] = []
    # Weakest first; stable, so equal peaks go by index.
    for k in np.argsort(peaks, kind="stable"):
        if len(chosen) == count or not (peaks[k] == 0 or peaks[k] < dead_fraction * typical):
            break
        chosen.append(int(k))
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    # A constant map has no direction: it correlates with nothing (similarity 0).
    unit = centred / np.where(norms > 0, norms, 1.0)[:, None]
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    kept = np.ones(num_kernels, bool)
    kept[chosen] = False
    while len(chosen) < count:
        among_kept = np.where(kept[None, :] & kept[:, None], similarity, -np.inf)
        closest = np.max(among_kept, axis=1)
        closest[~kept] = -np.inf
        best = np.max(closest)
        # A small tolerance: the two sides of a pair may differ in the last bits.
        candidates = np.flatnonzero(closest >= best - 1e-9)
        # Of equally similar kernels the weaker goes, then the later one.
        victim = int(max(candidates, key=lambda k: (-peaks[k], k)))
        chosen.append(victim)
        kept[victim] = False
    return np.sort(np.asarray(chosen, np.int64))
