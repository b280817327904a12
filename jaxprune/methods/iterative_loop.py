"""The fine-tuning between two iterative pruning steps, with the criterion reading its batches.

Molchanov et al. (ICLR 2017) accumulate the criterion over the mini-batches of the `u`
fine-tuning updates that precede each pruning step. Training reads one endless stream of
batches (`TrainStream`: the data's epochs one after another, so its position is two integers
a checkpoint can hold), each update through `train.train_step`, with the one divergence check
of `jaxprune.fit` (`DivergenceError`, naming the update and the loss).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import criteria, train
from jaxprune.fit import DivergenceError
from jaxprune.methods.contract import Batch, PruneData
from jaxprune.methods.iterative_network import Network, plain_variables
from jaxprune.sharding import default_mesh, place_batch, replicate

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class TrainStream:
    """The training batches of `data` as one endless stream: epoch 0, then 1, ...

    The position is ``(epoch, batches read of it)``. A stream opened at a saved position yields
    what the original stream yielded from there on, because ``data.train(epoch)`` is
    deterministic per epoch.

    Args:
      data: the data (``data.train(epoch)`` is read).
      epoch, index: the position to start from.
    """

    def __init__(self, data: PruneData, epoch: int = 0, index: int = 0) -> None:
        self.data = data
        self.epoch = epoch
        self.index = index
        self._batches: Iterator[Batch] | None = None
        # Batches are split over every device (`jaxprune.sharding`).
        self.mesh = default_mesh()

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batches read of it)``."""
        return self.epoch, self.index

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while True:
            if self._batches is None:
                self._batches = iter(self.data.train(self.epoch))
                skipped = sum(1 for _ in itertools.islice(self._batches, self.index))
                if skipped < self.index:
                    raise ValueError(
                        f"Epoch {self.epoch} of the training data has {skipped} batches, but the "
                        f"run had read {self.index} of it: the data changed since the run's "
                        "checkpoint. Resume with the same data, or use another workdir."
                    )
            batch = next(self._batches, None)
            if batch is not None:
                self.index += 1
                if self.mesh is None:
                    return {name: jnp.asarray(value) for name, value in batch.items()}
                return dict(place_batch(batch, self.mesh))
            if self.index == 0:
                raise ValueError(
                    f"Epoch {self.epoch} of the training data yields no batch; check the data "
                    "and its batch size."
                )
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None


def validation_batches(data: PruneData, limit: int | None) -> Iterator[Batch]:
    """The validation batches, cut after the first `limit` examples.

    Args:
      data: the data (``data.validation()`` is read).
      limit: how many examples (None: all).

    Returns:
      An iterator over the batches.
    """
    seen = 0
    for batch in data.validation():
        if limit is not None:
            if seen >= limit:
                return
            batch = {name: value[: limit - seen] for name, value in batch.items()}
        seen += len(batch["label"])
        yield batch


class CompileClock:
    """Sums the time JAX spends compiling (lowering + XLA), and counts the compilations.

    Use as a context manager around the work to watch; `take` returns what was spent since
    the previous `take`. An XLA compilation served from the persistent cache is counted too
    (it is cheaper); a call that reuses an already compiled program is not.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._count = 0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            self._seconds += duration
        if event == _BACKEND_COMPILE:
            self._count += 1

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def take(self) -> tuple[float, int]:
        """(seconds, compilations) since the last call."""
        spent = (self._seconds, self._count)
        self._seconds, self._count = 0.0, 0
        return spent


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    # One compiled reduction per set of shapes (eager ops would compile one per leaf shape).
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _diverged(update: int, what: str, last_saved: int | None, learning_rate: float) -> str:
    kept = (
        f"the checkpoint of update {last_saved} is kept"
        if last_saved is not None
        else "nothing was saved"
    )
    return (
        f"iterative pruning's fine-tuning diverged at update {update} ({what}); {kept}. Lower "
        f"the learning rate (IterativeConfig.optimizer.learning_rate={learning_rate}) or clip "
        "gradients (IterativeConfig.optimizer.grad_clip_norm)."
    )


def finetune_and_score(
    state: train.TrainState,
    stream: TrainStream,
    updates: int,
    *,
    network: Network,
    criterion: criteria.Criterion | None = None,
    score_updates: int | None = None,
    last_saved: int | None = None,
    learning_rate: float = math.nan,
) -> tuple[train.TrainState, Mapping[str, np.ndarray] | None, dict[str, float]]:
    """`updates` optimizer steps; the criterion reads the batches of the last `score_updates`.

    The criterion sees each batch with the variables before that batch's update, as the
    paper accumulates it during fine-tuning.

    Args:
      state: the train state (running ``network.model``).
      stream: the training batches.
      updates: how many steps.
      network: the current network (the criterion's context).
      criterion: the criterion, or None to train only.
      score_updates: how many of the last updates the criterion reads (None: all).
      last_saved: the update of the last checkpoint, named if training diverges.
      learning_rate: the learning rate, named if training diverges.

    Returns:
      The new state, the criterion's scores (None without one), and the wall time of
      training (``train_s``) and scoring (``score_s``).

    Raises:
      DivergenceError: a non-finite loss, gradient or parameter (the update and the loss
        named).
    """
    if stream.mesh is not None:
        state = replicate(state, stream.mesh)  # no copy when it already is
    score_from = updates - (score_updates or updates)
    times = {"train_s": 0.0, "score_s": 0.0}
    scores_state = None
    if criterion is not None:
        scores_state = criterion.init(network.context, plain_variables(state), state.masks)
    loss = math.nan
    for index in range(updates):
        batch = next(stream)
        if criterion is not None and criterion.uses_batches and index >= score_from:
            began = time.perf_counter()
            scores_state = criterion.update(
                scores_state, network.context, plain_variables(state), batch, state.masks
            )
            times["score_s"] += time.perf_counter() - began
        began = time.perf_counter()
        state, metrics = train.train_step(state, batch)
        loss = float(metrics["loss"])  # waits for the step, so the timing is the step's
        times["train_s"] += time.perf_counter() - began
        norm = float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = f"loss {loss}, gradient norm {norm}"
            raise DivergenceError(_diverged(int(state.step), what, last_saved, learning_rate))
    # Finite gradients can still step to non-finite weights; the criterion must not see them.
    if updates and not bool(_all_finite(state.params)):
        what = f"the parameters are no longer finite; last loss {loss}"
        raise DivergenceError(_diverged(int(state.step), what, last_saved, learning_rate))
    scores = None
    if criterion is not None:
        began = time.perf_counter()
        scores = criterion.finalize(
            scores_state, network.context, plain_variables(state), state.masks
        )
        times["score_s"] += time.perf_counter() - began
    return state, scores, times
