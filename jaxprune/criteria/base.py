"""The shape of a criterion: a NamedTuple of pure functions, and the context they score in.

A criterion turns (variables, graph, batches) into ``{group name: scores}``, one float per
channel, higher = more relevant. Like an optax transformation it is a small tuple of
functions::

  state = criterion.init(context, variables, masks)
  for batch in batches:
      state = criterion.update(state, context, variables, batch, masks)
  scores = criterion.finalize(state, context, variables, masks)

`update` runs a jitted per-batch statistic (the context is a static argument, so one compiled
program serves every batch and every later call with the same context) and adds it to the state
in float64 NumPy. `jaxprune.criteria.score` runs that loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.gates import gated_call
from jaxprune.graph import ChannelGraph
from jaxprune.sharding import to_host

Batch = Mapping[str, Any]
Masks = Mapping[str, jax.Array]
Scores = dict[str, np.ndarray]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of integer labels; shape (batch,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringContext:
    """What a criterion needs besides the variables and the data.

    A context is hashed by identity, so build it once and reuse it: the jitted per-batch
    functions are compiled once per context.

    Attributes:
      apply_fn: the model function the graph was built from, e.g. `model.apply`.
      graph: its channel graph (`jaxprune.graph.channel_graph`).
      loss_fn: maps (model output, labels) to one loss per example, shape (batch,). The loss C
        of a batch is their mean. Default: softmax cross-entropy with integer labels.
      apply_kwargs: keyword arguments of `apply_fn`; default ``{"train": False}`` (eval-mode
        BatchNorm, no dropout). With ``mutable=...`` the model returns (output, updates); the
        output is used.
    """

    apply_fn: Callable[..., Any]
    graph: ChannelGraph
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"train": False})

    def output(self, variables: Any, x: jax.Array, masks: Masks | None = None) -> jax.Array:
        """The gated model's output (logits) for a batch."""
        return model_output(
            gated_call(self.apply_fn, self.graph, variables, x, masks, **self.apply_kwargs)
        )

    def example_losses(self, output: jax.Array, labels: jax.Array) -> jax.Array:
        """`loss_fn` checked to give one loss per example."""
        losses = self.loss_fn(model_output(output), labels)
        if jnp.shape(losses) != (labels.shape[0],):
            raise ValueError(
                f"loss_fn returned shape {jnp.shape(losses)}; criteria need one loss per "
                f"example, shape ({labels.shape[0]},). Return the per-example losses "
                "(no mean over the batch), e.g. "
                "optax.softmax_cross_entropy_with_integer_labels(logits, labels)."
            )
        return losses


class Criterion(NamedTuple):
    """A relevance criterion as pure functions.

    Attributes:
      name: the registry name, e.g. "taylor".
      init: (context, variables, masks) -> state.
      update: (state, context, variables, batch, masks) -> state; runs the jitted per-batch
        statistic and accumulates it.
      finalize: (state, context, variables, masks) -> {group: scores}; one score per channel,
        higher = more relevant. Groups a criterion does not apply to are left out.
      uses_batches: False for criteria that read only the weights (they ignore the batches).
    """

    name: str
    init: Callable[..., Any]
    update: Callable[..., Any]
    finalize: Callable[..., Scores]
    uses_batches: bool = True


def model_output(output: Any) -> Any:
    """The model's own output of a call that may also return mutated collections."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Mapping):
        return output[0]
    return output


def batch_arrays(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(image, label) of a batch, checked.

    Raises:
      ValueError: a key is missing, or the label count differs from the image count.
    """
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"A batch must be a mapping with 'image' (float32 NHWC) and 'label' (int32) "
            f"entries; got {keys}."
        )
    image = jnp.asarray(batch["image"], jnp.float32)
    label = jnp.asarray(batch["label"], jnp.int32)
    if label.shape != (image.shape[0],):
        raise ValueError(
            f"A batch has {image.shape[0]} images but labels of shape {label.shape}; give one "
            "integer label per image."
        )
    return image, label


def no_state(context: ScoringContext, variables: Any, masks: Masks | None) -> None:
    """`init` of a criterion that keeps no state."""
    return None


def ignore_batch(
    state: Any, context: ScoringContext, variables: Any, batch: Batch, masks: Masks | None
) -> Any:
    """`update` of a criterion that reads only the weights."""
    return state


def add_stats(state: Mapping[str, Any] | None, stats: Mapping[str, Any]) -> dict[str, Any]:
    """Adds per-batch statistics (pytrees of arrays) to a float64 running sum."""
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), dict(stats))
    if state is None:
        return stats
    return jax.tree_util.tree_map(np.add, dict(state), stats)


def to_numpy(scores: Mapping[str, Any]) -> Scores:
    """Scores as float64 NumPy vectors."""
    return {
        name: np.asarray(s, np.float64).reshape(-1) for name, s in to_host(dict(scores)).items()
    }


def iter_batches(batches: Iterable[Batch] | Batch | None) -> Iterable[Batch]:
    """Accepts one batch or an iterable of batches."""
    if batches is None:
        return ()
    if isinstance(batches, Mapping):
        return (batches,)
    return batches


def summed_criterion(
    name: str,
    batch_stats: Callable[..., Mapping[str, Any]],
    finish: Callable[[Any, ScoringContext, Any, Masks | None], Scores],
) -> Criterion:
    """A criterion whose per-batch statistics add up over batches, then turn into scores.

    Args:
      name: the criterion's name.
      batch_stats: ``(context, variables, image, label, masks) -> stats`` for one batch.
      finish: ``(summed stats, context, variables, masks) -> {group: scores}``.

    Returns:
      The criterion; finalising it without any batch is a clear error.
    """

    def update(
        state: Any, context: ScoringContext, variables: Any, batch: Batch, masks: Masks | None
    ) -> dict:
        image, label = batch_arrays(batch)
        return add_stats(state, batch_stats(context, variables, image, label, masks))

    def finalize(
        state: Any, context: ScoringContext, variables: Any, masks: Masks | None
    ) -> Scores:
        if state is None:
            raise ValueError(f"Criterion {name!r} needs at least one batch of data.")
        return finish(state, context, variables, masks)

    return Criterion(name, no_state, update, finalize)
