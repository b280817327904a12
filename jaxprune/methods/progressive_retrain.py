"""Retraining after one layer is simplified (Osaku et al. 2021): progressive or complete.

Progressive retraining trains only the layers that feed the next layer's output: for layer l,
layers 1..l+1 (with their BatchNorm) learn to reproduce, at the output of layer l+1, the tensor
the model produced there before layer l lost kernels. Everything after (later convolutions,
the dense layers, the head) stays bit-identical. Complete retraining, the paper's ablation,
trains every layer on the cross-entropy of the labels.

Which variables belong to "layers 1..l+1" is read from the traced program, not from a table:
a leaf is trainable when the target tensor depends on it (`upstream_of`). In a chain that is
exactly layers 1..l+1; in a network with branches it is everything upstream of the target.

The target tensor of a group is where its consumers read it (its gate points, `jaxprune.gates`):
after the layer's normalisation and activation, and after a pooling that follows them, since a
VGG's next convolution reads the pooled maps. For the last simplified group whose next group is
a dense layer, the target is that dense layer's activation; when no group follows, the model's
output (the logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import data as data_lib
from jaxprune import train
from jaxprune.criteria.base import model_output
from jaxprune.gates import gated_call
from jaxprune.graph import ChannelGraph

PyTree = Any
ApplyFn = Callable[..., Any]
# A run's data order and augmentation are numbered stream * EPOCHS_PER_STREAM + epoch, so runs
# (layers) with fewer epochs than this never share an order.
EPOCHS_PER_STREAM = 1000


@dataclasses.dataclass(frozen=True)
class Network:
    """A model as the retraining sees it: its apply function, variables and channel graph."""

    apply_fn: ApplyFn
    variables: PyTree
    graph: ChannelGraph


@dataclasses.dataclass(frozen=True)
class RetrainPlan:
    """One retraining run (after one layer, or the final fine-tuning).

    Attributes:
      loss: "mse" (match the frozen model's tensor at `target_group`) or "cross_entropy".
      target_group: the group whose activation is matched; None: the model's output.
      trainable: pytree of bools like the variables (params and batch_stats); False leaves are
        never changed.
      learning_rate: SGD learning rate.
      momentum: SGD momentum.
      nesterov: Nesterov momentum.
      batch_size: images per update.
      epochs: passes over the (capped) training images.
      examples: training images used per epoch (the first ones of each epoch's order); None:
        the whole split.
      train_mode: run the model in training mode (BatchNorm on batch statistics, dropout); the
        running statistics of trainable layers then follow the data.
      seed: seed of the data order and dropout.
      stream: a number that makes this run's data order differ from other runs' (the layer
        index), so each layer sees its own shuffle.
    """

    loss: str
    target_group: str | None
    trainable: PyTree
    learning_rate: float
    momentum: float
    nesterov: bool
    batch_size: int
    epochs: int
    examples: int | None
    train_mode: bool
    seed: int
    stream: int


def next_group(graph: ChannelGraph, group: str) -> str | None:
    """The group after `group` in the graph's order (the layer l+1 of layer l).

    Args:
      graph: the model's channel graph.
      group: a group name.

    Returns:
      The next group's name, or None when `group` is the last.
    """
    names = list(graph.names)
    index = names.index(graph[group].name)
    return names[index + 1] if index + 1 < len(names) else None


def upstream_of(fn: Callable[[PyTree], Any], tree: PyTree) -> PyTree:
    """Which leaves of `tree` the output of `fn(tree)` depends on, from its traced program.

    The dependency is structural (a path in the program), not numerical: a leaf multiplied by
    zero still counts. Calls with a sub-program (jit, custom derivatives) are followed inside;
    any other higher-order primitive is taken to make every output depend on every input.

    Args:
      fn: a function of the tree.
      tree: a pytree of arrays or `jax.ShapeDtypeStruct`.

    Returns:
      A pytree of bools with the structure of `tree`.
    """
    closed = jax.make_jaxpr(fn)(tree)
    needed = _needed_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), needed)


def _sub_jaxpr(eqn: Any) -> Any:
    """The one sub-program of a call-like equation whose inputs and outputs match its own."""
    for value in eqn.params.values():
        jaxpr = getattr(value, "jaxpr", value)
        if (
            hasattr(jaxpr, "eqns")
            and len(jaxpr.invars) == len(eqn.invars)
            and len(jaxpr.outvars) == len(eqn.outvars)
        ):
            return jaxpr
    return None


def _needed_inputs(jaxpr: Any, used_outputs: list[bool]) -> list[bool]:
    """Backward liveness over a jaxpr: which invars reach the used outvars."""
    live: set[Any] = {v for v, used in zip(jaxpr.outvars, used_outputs, strict=True) if used}
    live = {v for v in live if not isinstance(v, jax.extend.core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        used = [v in live for v in eqn.outvars]
        if not any(used):
            continue
        inner = _sub_jaxpr(eqn)
        if inner is not None:
            reached = _needed_inputs(inner, used)
            sources = [v for v, r in zip(eqn.invars, reached, strict=True) if r]
        else:
            sources = list(eqn.invars)
        live.update(v for v in sources if not isinstance(v, jax.extend.core.Literal))
    return [v in live for v in jaxpr.invars]


def target_values(
    network: Network, image: jax.Array, target_group: str | None, **kwargs: Any
) -> tuple[Any, tuple[jax.Array, ...]]:
    """The model's output and the tensors at `target_group` (its gate points) for a batch.

    Args:
      network: the model.
      image: a preprocessed batch.
      target_group: the group to read; None reads the model's output.
      **kwargs: passed to the apply function (``train=...``, ``mutable=...``, ``rngs=...``).

    Returns:
      (the apply function's full output, the target tensors).
    """
    if target_group is None:
        output = network.apply_fn(network.variables, image, **kwargs)
        return output, (model_output(output),)
    output, captured = gated_call(
        network.apply_fn, network.graph, network.variables, image, capture=True, **kwargs
    )
    return output, captured[target_group]


def trainable_for(network: Network, target_group: str | None, image: Any) -> PyTree:
    """The variables progressive retraining may change: those the target depends on.

    Both losses train the same layers 1..l+1: with "cross_entropy" the loss reads the model
    output through the frozen rest, but only the leaves upstream of the target train.

    Args:
      network: the pruned model.
      target_group: the layer l+1 group (None: the output, everything trains).
      image: an example batch (its shape).

    Returns:
      A pytree of bools like ``network.variables``.
    """

    def read(variables: PyTree) -> Any:
        moved = dataclasses.replace(network, variables=variables)
        return target_values(moved, image, target_group, train=False)[1]

    return upstream_of(read, network.variables)


def _example_batches(
    dataset: Any, plan: RetrainPlan, epoch: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(batch index, raw batch) of one epoch, capped at `plan.examples` images."""
    count = steps_per_epoch(dataset, plan)
    # Each (layer, epoch) pair gets its own order: the stream keeps layers apart.
    batches = dataset.iterate(
        "train", plan.batch_size, seed=plan.seed, epoch=_order_epoch(plan, epoch), shuffle=True
    )
    for index, batch in enumerate(batches):
        if index == count:
            return
        yield index, batch


def _order_epoch(plan: RetrainPlan, epoch: int) -> int:
    if not 0 <= epoch < EPOCHS_PER_STREAM:
        raise ValueError(f"epoch {epoch} out of [0, {EPOCHS_PER_STREAM}); retrain fewer epochs.")
    return plan.stream * EPOCHS_PER_STREAM + epoch


def steps_per_epoch(dataset: Any, plan: RetrainPlan) -> int:
    """Updates in one epoch of a plan.

    Args:
      dataset: a `jaxprune.data.Dataset` (its "train" split).
      plan: the retraining plan (batch size and `examples` cap).

    Returns:
      Full batches in the split, capped at ``examples // batch_size`` (at least 1).
    """
    available = dataset.num_batches("train", plan.batch_size, drop_remainder=True)
    if plan.examples is None:
        return available
    return min(available, max(1, plan.examples // plan.batch_size))


def _mse(predicted: tuple[jax.Array, ...], target: tuple[jax.Array, ...]) -> jax.Array:
    return sum(jnp.mean(jnp.square(p - t)) for p, t in zip(predicted, target, strict=True)) / len(
        predicted
    )


def make_step(
    student: Network, teacher: Network | None, plan: RetrainPlan, tx: optax.GradientTransformation
) -> Callable[..., Any]:
    """The jitted update of a plan.

    The teacher (the model before the layer was pruned, frozen) gives the MSE target in
    evaluation mode; the student runs in training mode when `plan.train_mode`.

    Args:
      student: the pruned model being retrained.
      teacher: the frozen model before pruning (None for cross-entropy).
      plan: the retraining plan (loss, target, trainable leaves).
      tx: the optimizer (frozen leaves already mapped to `optax.set_to_zero`).

    Returns:
      ``step(params, batch_stats, opt_state, image, label, key) -> (params, batch_stats,
      opt_state, loss)``; frozen params and batch statistics come back bit-identical.
    """
    trainable_params = plan.trainable["params"]
    trainable_stats = plan.trainable.get("batch_stats", {})

    def apply_kwargs(key: jax.Array) -> dict[str, Any]:
        if plan.train_mode:
            return {"train": True, "mutable": ["batch_stats"], "rngs": {"dropout": key}}
        return {"train": False}

    @jax.jit
    def step(params, batch_stats, opt_state, image, label, key):
        if plan.loss == "mse":
            _, target = target_values(teacher, image, plan.target_group, train=False)
            target = jax.lax.stop_gradient(target)

        def loss_fn(params):
            variables = {**student.variables, "params": params, "batch_stats": batch_stats}
            moved = dataclasses.replace(student, variables=variables)
            kwargs = apply_kwargs(key)
            if plan.loss == "mse":
                output, predicted = target_values(moved, image, plan.target_group, **kwargs)
                loss = _mse(predicted, target)
            else:
                output = student.apply_fn(variables, image, **kwargs)
                logits = model_output(output)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
            updates = output[1] if plan.train_mode else {}
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        param_updates, opt_state = tx.update(grads, opt_state, params)
        # Frozen leaves are passed through untouched (not p + 0, which would turn -0.0 into 0.0).
        params = jax.tree.map(
            lambda keep, p, u: p + u if keep else p, trainable_params, params, param_updates
        )
        new_stats = updates.get("batch_stats", batch_stats) if updates else batch_stats
        batch_stats = jax.tree.map(
            lambda keep, new, old: new if keep else old, trainable_stats, new_stats, batch_stats
        )
        return params, batch_stats, opt_state, loss

    return step


def retrain(
    student: Network, teacher: Network | None, plan: RetrainPlan, dataset: Any
) -> tuple[PyTree, dict[str, Any]]:
    """Runs a retraining plan on the student; returns its new variables and loss statistics.

    Args:
      student: the pruned model (its variables are the starting point).
      teacher: the frozen model before pruning (needed for the MSE loss).
      plan: what to train, on what loss, how.
      dataset: a `jaxprune.data.Dataset` (its "train" split).

    Returns:
      (variables, {"updates", "first_loss", "last_loss", "mean_loss"}).

    Raises:
      ValueError: an MSE plan without a teacher; FloatingPointError: the loss diverged.
    """
    if plan.loss == "mse" and teacher is None:
        raise ValueError("MSE retraining needs the teacher (the model before pruning).")
    if plan.epochs == 0:
        return student.variables, {"updates": 0, "first_loss": None, "last_loss": None}
    per_epoch = steps_per_epoch(dataset, plan)
    optimizer = train.OptimizerConfig(
        name="sgd",
        learning_rate=plan.learning_rate,
        momentum=plan.momentum,
        nesterov=plan.nesterov and plan.momentum > 0,
        schedule="constant",
    )
    tx = train.make_optimizer(optimizer, per_epoch, plan.epochs, trainable=plan.trainable["params"])
    params = student.variables["params"]
    batch_stats = student.variables.get("batch_stats", {})
    opt_state = tx.init(params)
    step = make_step(student, teacher, plan, tx)
    base_key = jax.random.fold_in(jax.random.key(plan.seed), plan.stream)
    losses = []
    for epoch in range(plan.epochs):
        for index, raw in _example_batches(dataset, plan, epoch):
            key = data_lib.augmentation_key(plan.seed, _order_epoch(plan, epoch), index)
            image, label = dataset.preprocess(raw["image"], raw["label"], key, train=True)
            dropout_key = jax.random.fold_in(base_key, epoch * per_epoch + index)
            params, batch_stats, opt_state, loss = step(
                params, batch_stats, opt_state, image, label, dropout_key
            )
            losses.append(loss)
    values = np.asarray(jax.device_get(losses), np.float64)
    if not np.all(np.isfinite(values)):
        raise FloatingPointError(
            f"retraining diverged (loss {values[~np.isfinite(values)][0]}); lower the learning "
            f"rate ({plan.learning_rate})."
        )
    variables = {**student.variables, "params": params}
    if "batch_stats" in student.variables:
        variables["batch_stats"] = batch_stats
    return variables, {
        "updates": len(values),
        "first_loss": float(values[0]),
        "last_loss": float(values[-1]),
        "mean_loss": float(values.mean()),
    }


def learning_rate_for(breakpoints: tuple[tuple[int, float], ...], layer_index: int) -> float:
    """The learning rate of the last breakpoint at or before `layer_index` (0-based).

    Args:
      breakpoints: (first 0-based layer index, rate) pairs.
      layer_index: the layer's position among the simplified layers.

    Returns:
      The rate.

    Raises:
      ValueError: no breakpoint covers `layer_index` (the first must start at layer 0).
    """
    chosen = None
    for first, rate in sorted(breakpoints):
        if first <= layer_index:
            chosen = rate
    if chosen is None:
        raise ValueError(
            f"learning_rates {breakpoints} give no rate for layer {layer_index}; start the "
            "breakpoints at layer 0, e.g. ((0, 1e-5), (1, 1e-6))."
        )
    return float(chosen)


def all_trainable(variables: PyTree) -> PyTree:
    """Every leaf trainable (complete retraining, final fine-tuning).

    Args:
      variables: the model's variables.

    Returns:
      A pytree of True like `variables`.
    """
    return jax.tree.map(lambda _: True, variables)
