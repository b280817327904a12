"""The oracle: the exact change of the loss when each channel alone is removed.

Molchanov et al. (ICLR 2017) rank channels by this oracle to judge the other criteria; Osaku
et al. ("Convolutional Neural Network Simplification with Progressive Retraining", PRL 2021)
use the loss after removing each kernel of one layer as their objective criterion. Both are
`loss_after_removal` on one group; the criteria `oracle_loss` and `oracle_abs` run it on every
group.

The losses are exact (no approximation): each candidate is the gated model with one more
channel masked, which equals the pruned model. See `removal` for how the shared prefix and the
one-input-channel correction make all candidates of a group cost far less than one forward
pass each.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.criteria.base import (
    Batch,
    Criterion,
    Masks,
    Scores,
    ScoringContext,
    add_stats,
    batch_arrays,
    iter_batches,
)
from jaxprune.criteria.removal import removal_losses

# One candidate at a time is fastest on a CPU (vmapping the suffix only adds memory traffic);
# larger chunks can pay off on an accelerator.
DEFAULT_CANDIDATES_PER_STEP = 1


@functools.partial(jax.jit, static_argnames=("context", "group", "batch_size", "mode"))
def _removal_batch(
    context: ScoringContext,
    variables: Any,
    image: jax.Array,
    label: jax.Array,
    masks: Masks | None,
    group: str,
    batch_size: int,
    mode: str,
) -> dict[str, jax.Array]:
    def summed_loss(output):
        return jnp.sum(context.example_losses(output, label))

    base, removed = removal_losses(
        context.apply_fn,
        context.graph,
        variables,
        image,
        summed_loss,
        group,
        masks,
        batch_size=batch_size,
        mode=mode,
        **context.apply_kwargs,
    )
    return {"base": base, "removed": removed, "count": jnp.asarray(image.shape[0], jnp.float32)}


class RemovalLosses(NamedTuple):
    """Mean losses over the data for one group.

    Attributes:
      loss: the loss of the model as it is (with the given masks).
      removed: entry c is the loss with channel c also removed (shape (group size,)).
    """

    loss: float
    removed: np.ndarray


def _check_candidates(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size (candidates per step) must be an integer >= 1, got {batch_size!r}."
        )


def loss_after_removal(
    context: ScoringContext,
    variables: Any,
    batches: Iterable[Batch] | Batch,
    group: str,
    *,
    masks: Masks | None = None,
    batch_size: int = DEFAULT_CANDIDATES_PER_STEP,
    mode: str = "auto",
) -> RemovalLosses:
    """The mean loss over the batches with each channel of one group removed alone.

    This is Osaku et al.'s objective criterion (sensitivity) for one layer: a kernel whose
    removal raises the loss most is the most relevant. Channels already removed by `masks`
    stay removed in every candidate (removing them again changes nothing).

    Args:
      context: the scoring context.
      variables: the model variables.
      batches: one batch or an iterable of batches ({"image", "label"}).
      group: the group name.
      masks: the current masks, per group (1 keeps, 0 removed).
      batch_size: how many candidates are evaluated at once (memory grows with it).
      mode: "auto", "mask" or "delta" (see `removal.removal_losses`).

    Returns:
      The loss as it is and the loss after each removal, both means over all examples.

    Raises:
      ValueError: no batches, or a bad `batch_size`; GraphError: an unknown group.
    """
    _check_candidates(batch_size)
    context.graph[group]  # raises a clear error naming the groups there are
    state = None
    for batch in iter_batches(batches):
        image, label = batch_arrays(batch)
        state = add_stats(
            state,
            _removal_batch(context, variables, image, label, masks, group, batch_size, mode),
        )
    if state is None:
        raise ValueError("loss_after_removal needs at least one batch of data.")
    return RemovalLosses(float(state["base"] / state["count"]), state["removed"] / state["count"])


def _oracle(
    name: str,
    absolute: bool,
    batch_size: int,
    groups: Sequence[str] | None,
    mode: str,
) -> Criterion:
    _check_candidates(batch_size)

    def init(context: ScoringContext, variables: Any, masks: Masks | None) -> None:
        for g in groups or ():
            context.graph[g]  # an unknown group fails before any work
        return None

    def update(
        state: Any, context: ScoringContext, variables: Any, batch: Batch, masks: Masks | None
    ) -> dict:
        image, label = batch_arrays(batch)
        stats = {
            g: _removal_batch(context, variables, image, label, masks, g, batch_size, mode)
            for g in (groups or context.graph.names)
        }
        return add_stats(state, stats)

    def finalize(
        state: Any, context: ScoringContext, variables: Any, masks: Masks | None
    ) -> Scores:
        if state is None:
            raise ValueError(f"Criterion {name!r} needs at least one batch of data.")
        scores = {}
        for g, s in state.items():
            change = (s["removed"] - s["base"]) / s["count"]
            scores[g] = np.abs(change) if absolute else change
        return scores

    return Criterion(name, init, update, finalize)


def oracle_loss(
    *,
    batch_size: int = DEFAULT_CANDIDATES_PER_STEP,
    groups: Sequence[str] | None = None,
    mode: str = "auto",
) -> Criterion:
    """The signed oracle: ``s_c = C(without c) - C``, C the mean loss over all examples.

    Higher = removing the channel hurts more = more relevant; a negative score means the loss
    drops when the channel goes (Molchanov et al., ICLR 2017, the oracle ranking).

    Args:
      batch_size: candidates evaluated at once (chunks of a `jax.lax.map`).
      groups: score only these groups (default: all).
      mode: "auto", "mask" or "delta" (see `removal.removal_losses`).

    Returns:
      The criterion "oracle_loss".
    """
    return _oracle("oracle_loss", False, batch_size, groups, mode)


def oracle_abs(
    *,
    batch_size: int = DEFAULT_CANDIDATES_PER_STEP,
    groups: Sequence[str] | None = None,
    mode: str = "auto",
) -> Criterion:
    """The absolute oracle: ``s_c = |C(without c) - C|`` (Molchanov et al., ICLR 2017).

    Args:
      batch_size: candidates evaluated at once.
      groups: score only these groups (default: all).
      mode: "auto", "mask" or "delta".

    Returns:
      The criterion "oracle_abs".
    """
    return _oracle("oracle_abs", True, batch_size, groups, mode)
