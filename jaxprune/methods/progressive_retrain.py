"""Retraining after one layer is simplified (Osaku et al. 2021): progressive or complete.

Progressive retraining trains only the layers that feed the next layer's output: for layer l,
layers 1..l+1 learn to reproduce, at the output of layer l+1, the tensor the model produced
there before layer l lost kernels (MSE, as the authors' code). Everything after (later
convolutions, the dense layers, the head) stays bit-identical. Complete retraining, the paper's
ablation, trains every layer on the cross-entropy of the labels.

Which variables belong to "layers 1..l+1" is read from the traced program, not from a table:
a leaf is trainable when the target tensor depends on it (`upstream_of`). In a chain that is
exactly layers 1..l+1; in a network with branches it is everything upstream of the target.

The target tensor of a group is where its consumers read it (its gate points, `jaxprune.gates`):
after the layer's normalisation and activation, and after a pooling that follows them, since a
VGG's next convolution reads the pooled maps. For the last simplified group whose next group is
a dense layer, the target is that dense layer's activation; when no group follows, the model's
output (the logits).

Both the target (the model before pruning) and the student (the pruned model) run their
*evaluation* call: no dropout and BatchNorm on its running statistics. The authors' partial
model (layers 1..l+1) holds no dropout, so a student with dropout active would chase a target
it can never reach (on VGG-small the loss floor with nothing pruned was 0.333 against a target
mean square of 0.327). BatchNorm (which the authors' VGG-16 does not have) follows
`BATCH_NORM`:

* ``"frozen"`` (default): the running statistics never change, as in a network without
  BatchNorm; only the weights learn;
* ``"recalibrate"`` (ours): after the weights are retrained, the running statistics of the
  trainable layers are re-estimated by the model's own training call (its BatchNorm momentum)
  over the same retraining images. With no retraining this is the BatchNorm-only control.

Training goes through `jaxprune.fit.fit` (its train step, frozen leaves through
`optax.multi_transform` with `optax.set_to_zero`, its divergence check).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import train
from jaxprune.criteria.base import model_output
from jaxprune.fit import FitConfig, fit
from jaxprune.gates import gated_call
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.model import Model
from jaxprune.sharding import default_mesh, place_batch, replicate, to_host

PyTree = Any
Batch = Mapping[str, Any]
BATCH_NORM = ("frozen", "recalibrate")
LOSSES = ("mse", "cross_entropy")
# The collection that carries the teacher's variables through the train step.
_TEACHER = "teacher"


@dataclasses.dataclass(frozen=True)
class Network:
    """A model as the method sees it between two layers: how to call it, its variables and
    its channel graph (traced on this model, so its groups have the current widths)."""

    model: Model
    variables: PyTree
    graph: ChannelGraph

    @classmethod
    def of(cls, model: Model, variables: PyTree) -> Network:
        """The network of `model` with `variables`.

        Args:
          model: how to call the model (a pruned program is fine).
          variables: its variables.

        Returns:
          The network, its channel graph traced at the model's example input.
        """
        graph = channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
        return cls(model, variables, graph)


@dataclasses.dataclass(frozen=True)
class RetrainPlan:
    """One layer's retraining.

    Attributes:
      loss: "mse" (match the model before pruning at `target_group`) or "cross_entropy".
      target_group: the group whose activation is matched; None: the model's output.
      trainable: a pytree of bools like the variables; False leaves never change (params,
        and, with recalibration, statistics).
      learning_rate: SGD learning rate.
      momentum: SGD momentum.
      nesterov: Nesterov momentum.
      epochs: passes over the layer's training images; 0: the weights are not trained.
      batch_norm: "frozen" or "recalibrate" (`BATCH_NORM`).
    """

    loss: str
    target_group: str | None
    trainable: PyTree
    learning_rate: float
    momentum: float
    nesterov: bool
    epochs: int
    batch_norm: str = "frozen"


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
    network: Network, variables: PyTree, image: Any, target_group: str | None
) -> tuple[jax.Array, ...]:
    """The tensors at `target_group` (its gate points) in the evaluation call.

    Args:
      network: the model (its apply function, evaluation keywords and graph).
      variables: its variables (those of `network`, or new ones of the same shapes).
      image: an input batch.
      target_group: the group to read; None reads the model's output.

    Returns:
      One array per gate point of the group (the output alone for None).
    """
    model = network.model
    if target_group is None:
        return (model_output(model.apply_fn(variables, image, **model.eval_kwargs)),)
    _, captured = gated_call(
        model.apply_fn, network.graph, variables, image, capture=True, **model.eval_kwargs
    )
    return tuple(captured[target_group])


def trainable_for(network: Network, target_group: str | None) -> PyTree:
    """The variables progressive retraining may change: those the target depends on.

    Both losses train the same layers 1..l+1: with "cross_entropy" the loss reads the model
    output through the frozen rest, but only the leaves upstream of the target train.

    Args:
      network: the pruned model.
      target_group: the layer l+1 group (None: the output, everything upstream of it).

    Returns:
      A pytree of bools like ``network.variables``.
    """
    image = jnp.zeros(network.model.example_input.shape, network.model.example_input.dtype)
    return upstream_of(
        lambda variables: target_values(network, variables, image, target_group),
        network.variables,
    )


def all_trainable(variables: PyTree) -> PyTree:
    """Every leaf trainable (complete retraining).

    Args:
      variables: the model's variables.

    Returns:
      A pytree of True like `variables`.
    """
    return jax.tree.map(lambda _: True, variables)


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


# ---------------------------------------------------------------------------------------------
# The layer's training images
# ---------------------------------------------------------------------------------------------


def rebatch(
    batches: Iterable[Batch],
    size: int | None,
    limit: int | None = None,
    *,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """The examples of `batches` in batches of `size`.

    Args:
      batches: batches (dicts of arrays with the same leading size).
      size: examples per batch; None: the batches as they come.
      limit: only the first `limit` examples; None: all.
      drop_remainder: drop the last examples that do not fill a batch (training); False
        yields them as a shorter last batch (scoring, evaluation).

    Yields:
      Host batches (NumPy arrays), in order.
    """
    if size is None:
        seen = 0
        for batch in batches:
            count = len(next(iter(batch.values())))
            if limit is not None and seen + count > limit:
                if limit - seen > 0:
                    yield {k: v[: limit - seen] for k, v in to_host(dict(batch)).items()}
                return
            seen += count
            yield to_host(dict(batch))
        return
    pending: dict[str, list[np.ndarray]] = {}
    held, seen = 0, 0
    for batch in batches:
        arrays = to_host(dict(batch))
        for key, value in arrays.items():
            pending.setdefault(key, []).append(value)
        held += len(next(iter(arrays.values())))
        while held >= size and (limit is None or seen + size <= limit):
            joined = {k: np.concatenate(v) for k, v in pending.items()}
            yield {k: v[:size] for k, v in joined.items()}
            pending = {k: [v[size:]] for k, v in joined.items()}
            held -= size
            seen += size
        if limit is not None and seen + held >= limit:
            break  # every example wanted has been read
    rest = held if limit is None else min(held, limit - seen)
    if not drop_remainder and rest > 0:
        yield {k: np.concatenate(v)[:rest] for k, v in pending.items()}


def count_examples(batches: Iterable[Batch], limit: int | None = None) -> int:
    """How many examples `batches` hold.

    Args:
      batches: batches (dicts of arrays with the same leading size).
      limit: stop reading once this many are seen (and return it); None: read all.

    Returns:
      The count.
    """
    seen = 0
    for batch in batches:
        seen += len(next(iter(batch.values())))
        if limit is not None and seen >= limit:
            return limit
    return seen


@dataclasses.dataclass(frozen=True)
class EpochData:
    """A run's training data as one retraining sees it: epoch e reads the data's epoch
    ``first_epoch + e``, in batches of `batch_size`, its first `examples` images only.

    Successive layers read successive epochs of the data, so each sees its own order (a
    `jaxprune.data.Dataset` shuffles per epoch) and a resumed run reads the same images.
    """

    data: Any
    first_epoch: int
    batch_size: int | None
    examples: int | None
    steps_per_epoch: int

    def train(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Epoch `epoch` of this retraining: the data's epoch ``first_epoch + epoch``."""
        return rebatch(self.data.train(self.first_epoch + epoch), self.batch_size, self.examples)

    def validation(self) -> Iterable[Batch]:
        """The data's validation batches, unchanged."""
        return self.data.validation()


def epoch_data(
    data: Any, first_epoch: int, batch_size: int | None, examples: int | None
) -> EpochData:
    """`EpochData` with its number of steps counted from the data's epoch `first_epoch`.

    Args:
      data: `PruneData`.
      first_epoch: the data's epoch read as this retraining's epoch 0.
      batch_size: images per batch; None: the data's batches.
      examples: images per epoch (the first ones); None: all.

    Returns:
      The `EpochData` (its epochs are assumed to hold as many images as the first).

    Raises:
      ValueError: the epoch holds less than one batch.
    """
    available = count_examples(data.train(first_epoch), examples)
    if batch_size is None:
        steps = sum(1 for _ in rebatch(data.train(first_epoch), None, examples))
    else:
        steps = available // batch_size
    if steps < 1:
        raise ValueError(
            f"The training data holds {available} images, less than one retraining batch of "
            f"{batch_size}; lower the batch size or give more training data."
        )
    return EpochData(data, first_epoch, batch_size, examples, steps)


# ---------------------------------------------------------------------------------------------
# Retraining
# ---------------------------------------------------------------------------------------------


def _mse(output: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]], batch: Batch) -> jax.Array:
    """Mean squared difference of the student's and the teacher's tensors (mean over points)."""
    del batch
    predicted, target = output
    pairs = zip(predicted, target, strict=True)
    return sum(jnp.mean(jnp.square(p - t)) for p, t in pairs) / len(predicted)


def _cross_entropy(output: jax.Array, batch: Batch) -> jax.Array:
    return train.cross_entropy(output, batch)


def retraining_model(student: Network, teacher: Network | None, plan: RetrainPlan) -> Model:
    """The model the train step runs: the student's evaluation call, and for MSE the
    teacher's tensors at the target next to the student's.

    Its training call is its evaluation call (no dropout, BatchNorm on running statistics) and
    updates no collection. The teacher's variables travel as the ``"teacher"`` collection, so
    they are arguments of the compiled step, not constants baked into it.

    Args:
      student: the pruned model.
      teacher: the model before pruning (for MSE).
      plan: the retraining plan.

    Returns:
      A `Model` whose output is ``(student tensors, teacher tensors)`` for MSE, the student's
      logits for cross-entropy.
    """

    def apply(variables: PyTree, x: Any) -> Any:
        own = {k: v for k, v in variables.items() if k != _TEACHER}
        if plan.loss == "mse":
            assert teacher is not None
            got = target_values(student, own, x, plan.target_group)
            want = target_values(teacher, variables[_TEACHER], x, plan.target_group)
            return got, jax.lax.stop_gradient(want)
        return model_output(student.model.apply_fn(own, x, **student.model.eval_kwargs))

    return Model(apply, student.model.example_input, name=f"retrain_{student.model.name}")


def retrain(
    student: Network,
    teacher: Network | None,
    plan: RetrainPlan,
    data: EpochData,
    *,
    seed: int = 0,
) -> tuple[PyTree, dict[str, Any]]:
    """Trains the student's trainable weights on the plan's loss; frozen leaves stay as they are.

    Args:
      student: the pruned model (its variables are the starting point).
      teacher: the model before pruning (needed for the MSE loss).
      plan: what to train, on what loss, how.
      data: the layer's training images (`epoch_data`).
      seed: seed of the train state's key.

    Returns:
      (variables, {"updates", "epoch_loss": mean loss per epoch}).

    Raises:
      ValueError: an MSE plan without a teacher; `jaxprune.fit.DivergenceError`: the loss
        became non-finite (the step and the loss are named).
    """
    if plan.loss == "mse" and teacher is None:
        raise ValueError("MSE retraining needs the teacher (the model before pruning).")
    if plan.epochs == 0:
        return student.variables, {"updates": 0, "epoch_loss": []}
    optimizer = train.OptimizerConfig(
        name="sgd",
        learning_rate=plan.learning_rate,
        momentum=plan.momentum,
        nesterov=plan.nesterov and plan.momentum > 0,
        schedule="constant",
    )
    tx = train.make_optimizer(
        optimizer, data.steps_per_epoch, plan.epochs, trainable=plan.trainable["params"]
    )
    variables = dict(student.variables)
    if plan.loss == "mse":
        assert teacher is not None
        variables[_TEACHER] = teacher.variables
    trained, history = fit(
        retraining_model(student, teacher, plan),
        variables,
        data,
        FitConfig(epochs=plan.epochs, optimizer=optimizer, seed=seed),
        progress=False,
        label="retraining",
        loss_fn=_mse if plan.loss == "mse" else _cross_entropy,
        tx=tx,
    )
    trained = {k: v for k, v in trained.items() if k != _TEACHER}
    return trained, {
        "updates": int(history[-1]["step"]) if history else 0,
        "epoch_loss": [float(h["loss"]) for h in history],
    }


def recalibrate(
    network: Network, trainable: PyTree, data: EpochData, epochs: int, *, seed: int = 0
) -> tuple[PyTree, dict[str, Any]]:
    """Re-estimates the running statistics of the trainable layers on the layer's images.

    Each batch runs the model's own training call (its BatchNorm momentum; dropout, when the
    model has it, does not reach the statistics before it); the updated collections are kept
    only for trainable leaves, so later layers' statistics stay bit-identical.

    Args:
      network: the model after its weights were retrained.
      trainable: a pytree of bools like its variables.
      data: the layer's training images.
      epochs: passes over them.
      seed: seed of the training call's random streams.

    Returns:
      (variables, {"batches": how many batches were read}).
    """
    model = network.model
    if not model.mutable or epochs == 0:
        return network.variables, {"batches": 0}

    @jax.jit
    def step(variables: PyTree, image: Any, key: jax.Array) -> PyTree:
        _, updates = model.train_apply(variables, image, key)
        return {
            name: jax.tree.map(
                lambda keep, new, old: new if keep else old,
                trainable[name],
                updates[name],
                variables[name],
            )
            for name in updates
            if name in variables
        }

    mesh = default_mesh()  # batches split over every device
    variables = dict(network.variables if mesh is None else replicate(network.variables, mesh))
    base = jax.random.key(seed)
    batches = 0
    for epoch in range(epochs):
        for batch in itertools.islice(data.train(epoch), data.steps_per_epoch):
            key = jax.random.fold_in(base, batches)
            image = place_batch({"image": batch["image"]}, mesh)["image"]
            variables.update(step(variables, image, key))
            batches += 1
    return variables, {"batches": batches}
