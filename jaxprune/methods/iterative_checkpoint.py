"""Where an iterative pruning run stands, checkpointed in its run directory and read back.

A checkpoint holds the train state's arrays (step, parameters, every other collection, the
optimizer state, the random key) and the masks, and as JSON the cumulative keep (the original
channels physically present, which fix every array's shape), the progress counters, the
position in the training stream and the history. A run killed at any point and run again
resumes from its last checkpoint and ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from jaxprune import train
from jaxprune.graph import ChannelGraph
from jaxprune.methods.iterative_network import Network, make_network
from jaxprune.model import Model
from jaxprune.run import Checkpoints

# The name of the run directory's checkpoint sequence (``checkpoints/prune/``).
SEQUENCE = "prune"


@dataclasses.dataclass(frozen=True)
class Progress:
    """The JSON part of a run's position, checkpointed with its train state.

    Attributes:
      steps: pruning steps done.
      stop_reason: why pruning stopped; None while it goes on.
      stop_update: the update count when it stopped.
      stream: the training stream's position, ``(epoch, batches read of it)``.
      history: one record per pruning step.
      base_validation: the validation metrics of the model before pruning.
    """

    steps: int
    stop_reason: str | None
    stop_update: int | None
    stream: tuple[int, int]
    history: tuple[dict[str, Any], ...]
    base_validation: dict[str, float] | None


def _arrays(state: train.TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "collections": state.collections,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "masks": state.masks,
    }


def save(
    store: Checkpoints | None, state: train.TrainState, network: Network, progress: Progress
) -> None:
    """Checkpoints the run at its update count (nothing without a run directory).

    Args:
      store: the run's checkpoint sequence, or None.
      state: the train state; network: its network; progress: the counters and history.
    """
    if store is None:
        return
    meta = {
        "keep": {name: kept.tolist() for name, kept in network.keep.items()},
        "progress": dataclasses.asdict(progress),
    }
    store.save(int(state.step), _arrays(state), meta)


def restore(
    store: Checkpoints | None,
    *,
    model: Model,
    original: ChannelGraph,
    base: Any,
    tx: optax.GradientTransformation,
) -> tuple[train.TrainState, Network, Progress] | None:
    """The run's last checkpoint, or None when it has none.

    Args:
      store: the run's checkpoint sequence, or None.
      model, original, base: the user's model, its graph and variable shapes
        (`iterative_network.make_network`).
      tx: the optimizer.

    Returns:
      ``(state, network, progress)`` as they were saved.

    Raises:
      CheckpointError: a damaged checkpoint, or arrays that are not the ones saved.
    """
    step = None if store is None else store.latest_step()
    if step is None:
        return None
    meta = store.meta(step)  # its keep fixes the shapes the arrays are read into
    keep = {name: np.asarray(kept, np.int64) for name, kept in meta["keep"].items()}
    network = make_network(model, original, base, keep)
    masks = network.full_masks()

    def fresh(variables: Any) -> dict[str, Any]:
        return _arrays(
            train.create_train_state(
                network.model,
                tx,
                jax.random.key(0),
                model.example_input,
                masks=masks,
                variables=variables,
            )
        )

    target = jax.eval_shape(fresh, network.variables)
    arrays, meta = store.restore(step, target)
    state = train.TrainState(model=network.model, tx=tx, **arrays)
    saved = meta["progress"]
    progress = Progress(
        steps=int(saved["steps"]),
        stop_reason=saved["stop_reason"],
        stop_update=saved["stop_update"],
        stream=(int(saved["stream"][0]), int(saved["stream"][1])),
        history=tuple(saved["history"]),
        base_validation=saved["base_validation"],
    )
    return state, network, progress
