"""`score`: run a criterion over batches and return one score per channel of every group."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxprune.criteria.base import Batch, Criterion, Scores, ScoringContext, iter_batches, to_numpy
from jaxprune.criteria.registry import get_criterion
from jaxprune.sharding import default_mesh, place_batch, replicate
from jaxprune.surgery import PruneError, check_tree


def check_masks(context: ScoringContext, masks: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Masks as float32 arrays, checked against the graph (names and sizes).

    Raises:
      ValueError: an unknown group or a mask of the wrong shape.
    """
    if masks is None:
        return None
    checked = {}
    for name, mask in masks.items():
        if name not in context.graph:
            raise ValueError(
                f"Masks name an unknown group {name!r}; the groups are {list(context.graph.names)}."
            )
        size = context.graph[name].size
        if np.shape(mask) != (size,):
            raise ValueError(
                f"The mask of group {name!r} has shape {np.shape(mask)}; it needs ({size},)."
            )
        checked[name] = jnp.asarray(mask, jnp.float32)
    return checked


def score(
    criterion: Criterion | str,
    context: ScoringContext,
    variables: Any,
    batches: Iterable[Batch] | Batch | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    **options: Any,
) -> Scores:
    """Scores every channel of every group: higher = more relevant.

    Args:
      criterion: a `Criterion`, or a registry name (see `CRITERIA`).
      context: the model, its graph and the loss (`ScoringContext`).
      variables: the model variables.
      batches: an iterable of batches (or one batch), each ``{"image": float32 NHWC,
        "label": int32}``; ignored by weight criteria and "random".
      masks: per group, the current masks (1 kept, 0 removed). The surviving model is scored
        and removed channels get -inf.
      mesh: the devices the batches are split over (`jaxprune.sharding`); default: every
        device of every process. Each batch whose size divides evenly is split along the data
        axis; the statistics are reduced over it by XLA, so the scores equal one device's to
        float rounding.
      **options: options of a criterion given by name (e.g. ``variant=``, ``bins=``).

    Returns:
      Per group, a float64 vector of one score per channel. Groups a criterion does not apply
      to (BatchNorm criteria on a group without BatchNorm, HRank on a dense layer) are absent.

    Raises:
      ValueError: bad masks, no batches for a data criterion, or options with a `Criterion`.

    Example:
      >>> context = ScoringContext(model.apply, channel_graph(model.apply, variables, x))
      >>> scores = score("taylor", context, variables, [{"image": x, "label": y}])
      >>> scores["conv1"].shape
      (32,)
    """
    if isinstance(criterion, str):
        criterion = get_criterion(criterion, **options)
    elif options:
        raise ValueError(
            f"Options {sorted(options)} were given with a Criterion object; pass them to its "
            "constructor, or give the criterion by name."
        )
    try:
        check_tree(context.graph, variables)
    except PruneError as e:  # a stale graph would give scores for channels that do not exist
        raise ValueError(
            str(e).replace("The variables do not match", "The variables scored do not match")
        ) from None
    checked = check_masks(context, masks)
    state = criterion.init(context, variables, checked)
    if criterion.uses_batches:
        mesh = default_mesh() if mesh is None else mesh
        placed = variables if mesh is None or mesh.size == 1 else replicate(variables, mesh)
        seen = 0
        for batch in iter_batches(batches):
            state = criterion.update(state, context, placed, place_batch(batch, mesh), checked)
            seen += 1
        if seen == 0:
            raise ValueError(
                f"Criterion {criterion.name!r} reads the data: pass at least one batch "
                "({'image': ..., 'label': ...})."
            )
    found = to_numpy(criterion.finalize(state, context, variables, checked))
    scores = {name: found[name] for name in context.graph.names if name in found}
    for name, values in scores.items():
        if checked is not None and name in checked:
            values[np.asarray(checked[name]) == 0] = -np.inf
    return scores
