"""The one training loop: fine-tuning after pruning, training between pruning steps.

`fit(model, variables, data, config)` trains any `Model` (a pruned program included) on
`PruneData` epochs with the train step of `jaxprune.train`, and returns the new variables and a
history. With a `RunDir` it checkpoints every `checkpoint_every` steps and resumes mid-epoch
(the data's epochs are deterministic, so a resumed run sees the same batches and ends identical
to an uninterrupted one). Divergence is one check: a non-finite loss or gradient norm stops the
loop before the state holding it is saved, with the step, the loss and the last good checkpoint
named.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from tqdm import tqdm

from jaxprune import train
from jaxprune.metrics import MetricsWriter
from jaxprune.model import Model
from jaxprune.run import Checkpoints, RunDir
from jaxprune.runtime import release_compiled_programs_if_crowded
from jaxprune.sharding import default_mesh, place_batch, replicate

Batch = Mapping[str, Any]


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient; nothing after the last good checkpoint
    was kept."""


def _default_optimizer() -> train.OptimizerConfig:
    return train.OptimizerConfig(
        name="sgd", learning_rate=0.01, momentum=0.9, schedule="cosine", weight_decay=5e-4
    )


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How to train (fine-tune)."""

    # Passes over the training data; may be fractional (0.5: the first half of an epoch).
    epochs: float = 1.0
    # The optimizer and its schedule (default: SGD, momentum 0.9, cosine from 0.01, decay 5e-4).
    optimizer: train.OptimizerConfig = dataclasses.field(default_factory=_default_optimizer)
    # Seed of the dropout and of the optimizer state's random key.
    seed: int = 0
    # Save a checkpoint every this many steps (with a run directory), and at the end.
    checkpoint_every: int = 200

    def check(self) -> None:
        """Raises ValueError naming the first invalid field."""
        if not self.epochs > 0:
            raise ValueError(f"FitConfig.epochs must be > 0, got {self.epochs}.")
        if self.checkpoint_every < 1:
            raise ValueError(
                f"FitConfig.checkpoint_every must be >= 1, got {self.checkpoint_every}."
            )
        train.make_optimizer(self.optimizer, 1, 1.0)  # validates the optimizer


def count_batches(data: Any) -> int:
    """The number of batches in one training epoch of `data` (read once)."""
    sized = getattr(data, "steps_per_epoch", None)
    if sized is not None:
        return int(sized)
    return sum(1 for _ in data.train(0))


def fit(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: FitConfig = FitConfig(),
    *,
    run: RunDir | None = None,
    name: str = "fit",
    progress: bool = True,
    label: str = "fine-tuning",
    loss_fn: Callable[[Any, Batch], jax.Array] = train.cross_entropy,
    tx: optax.GradientTransformation | None = None,
    metrics: MetricsWriter | None = None,
    log_every: int = 50,
    step_offset: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains `model` from `variables` for `config.epochs` epochs of `data.train(epoch)`.

    Args:
      model: how to call the model (a pruned program is fine).
      variables: its variables (``{"params": ..., ...}``).
      data: `PruneData` (``train(epoch)`` yields batches ``{"image", "label"}``).
      config: epochs, optimizer, seed.
      run: a run directory to checkpoint into and resume from.
      name: the name of this fit's checkpoint sequence in `run` (one run may hold several).
      progress: show a progress bar.
      label: the bar's label.
      loss_fn: ``(output, batch) -> loss``.
      tx: an optimizer to use instead of `config.optimizer` (e.g. with frozen leaves).
      metrics: a live metrics writer: the mean loss every `log_every` steps and at each
        epoch's end, as kind `name`, at ``step_offset + step``.
      log_every: see `metrics`.
      step_offset: where this fit's steps start in the run's metrics (e.g. the updates made
        before it).

    Returns:
      The trained variables and the history (one record per epoch, with the mean loss).

    Raises:
      DivergenceError: the loss or gradient norm became non-finite (the message names the
        step, the loss and the last checkpoint kept).
    """
    config.check()
    steps_per_epoch = count_batches(data)
    if steps_per_epoch == 0:
        raise ValueError("The training data yields no batch; check the data and batch size.")
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    tx = tx or train.make_optimizer(config.optimizer, steps_per_epoch, config.epochs)
    state = train.create_train_state(
        model, tx, jax.random.key(config.seed), model.example_input, variables=variables
    )
    # Every device of every process: each batch is split along the data axis (`sharding`).
    mesh = default_mesh()
    history: list[dict[str, Any]] = []
    step = 0
    sums, count = 0.0, 0  # the loss of the epoch so far
    window, window_count = 0.0, 0  # the loss since the last metrics record
    store = run.checkpoints(name) if run is not None else None
    if store is not None:
        restored = _restore(store, state)
        if restored is not None:
            state, meta = restored
            history, (sums, count) = list(meta["history"]), meta["epoch_loss"]
            step = int(state.step)
    if mesh is not None:
        state = replicate(state, mesh)
    bar = tqdm(total=total, initial=step, desc=label, unit="step", disable=not progress)
    last_saved = step if step else None
    with bar:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            for index, batch in enumerate(data.train(epoch)):
                if index < start:
                    continue
                state, measured = train.train_step(state, dict(place_batch(batch, mesh)), loss_fn)
                loss, norm = float(measured["loss"]), float(measured["grad_norm"])
                step += 1
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    kept = (
                        f"the checkpoint of step {last_saved} is kept"
                        if last_saved is not None
                        else "nothing was saved"
                    )
                    raise DivergenceError(
                        f"{label} diverged at step {step} (loss {loss}, gradient norm {norm}); "
                        f"{kept}. Lower the learning rate "
                        f"(optimizer.learning_rate={config.optimizer.learning_rate}) or clip "
                        "gradients (optimizer.grad_clip_norm)."
                    )
                sums, count = sums + loss, count + 1
                window, window_count = window + loss, window_count + 1
                if metrics is not None and (step % log_every == 0 or step == total):
                    metrics.write(step_offset + step, name, loss=window / window_count)
                    window, window_count = 0.0, 0
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                end_of_epoch = (index + 1 == steps_per_epoch) or step == total
                if end_of_epoch:
                    history.append({"epoch": epoch + 1, "step": step, "loss": sums / count})
                    sums, count = 0.0, 0
                    release_compiled_programs_if_crowded()
                if store is not None and (step % config.checkpoint_every == 0 or step == total):
                    meta = {"history": history, "epoch_loss": [sums, count]}
                    store.save(step, _arrays(state), meta)
                    last_saved = step
                if step == total:
                    break
            else:
                if start and index < start:  # an epoch shorter than a resumed position
                    raise ValueError("The training data changed between the run and its resume.")
    return state.variables(), history


def _arrays(state: train.TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "collections": state.collections,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def _restore(
    checkpoints: Checkpoints, state: train.TrainState
) -> tuple[train.TrainState, dict[str, Any]] | None:
    step = checkpoints.latest_step()
    if step is None:
        return None
    target = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), _arrays(state)
    )
    arrays, meta = checkpoints.restore(step, target)
    return state.replace(**arrays), meta
