"""Training: the train state, optimizers, jitted train/eval steps, data parallelism, evaluation.

The pieces follow the Flax examples: `create_train_state` builds a `TrainState` for a `Model`,
`train_step` and `eval_step` are jitted pure functions of (state, batch), and `evaluate` counts
every example of a split once. The loops around them are `jaxprune.fit.fit` (fine-tuning, the
methods' training) and `jaxprune.train_job.train_and_evaluate` (training a zoo model).

Data parallelism uses `jax.sharding`: a 1-D mesh over every device (axis ``"data"``), the
batch split along its leading axis, the state replicated. The jitted steps are written for one
global batch; XLA inserts the gradient all-reduce, so the same code runs on 1 or N devices.

Example:
  >>> state = train.create_train_state(module, tx, jax.random.key(0), x)
  >>> state, metrics = train.train_step(state, {"image": x, "label": y})
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from jaxprune.model import Model
from jaxprune.sharding import make_mesh, shard_batch, to_host

PyTree = Any
Batch = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: the ``"params"`` collection (what is trained).
      collections: every other collection of the variables (``{"batch_stats": ...}`` for
        BatchNorm; ``{}`` for a model without state); a training call updates those in
        `Model.mutable`.
      opt_state: the optimizer state of `tx`.
      rng: raw PRNG key data (uint32), split at every step for dropout. Raw data rather than a
        typed key, so that checkpoints store it as a plain array.
      model: how the model is called (static).
      tx: the optimizer (static).
      masks: optional pytree of per-channel gate vectors, passed to the model as the
        ``"masks"`` collection (see `gates.gated_apply_fn`). They are traced inputs, so changing
        them never recompiles.
    """

    step: jax.Array
    params: PyTree
    collections: dict[str, PyTree]
    opt_state: optax.OptState
    rng: jax.Array
    model: Model = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    masks: PyTree | None = None

    @property
    def batch_stats(self) -> PyTree:
        """The ``"batch_stats"`` collection (``{}`` without BatchNorm)."""
        return self.collections.get("batch_stats", {})

    @property
    def apply_fn(self) -> Callable[..., Any]:
        return self.model.apply_fn

    def variables(self, params: PyTree | None = None) -> dict[str, PyTree]:
        """The variables for the model (with `params` in place of the state's)."""
        variables = {"params": self.params if params is None else params, **self.collections}
        if self.masks is not None:
            variables["masks"] = self.masks
        return variables


def _as_key_data(rng: jax.Array) -> jax.Array:
    """Returns raw uint32 key data for a typed key or for raw key data."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, dtype=jnp.uint32)


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    example_input: jax.Array,
    *,
    masks: PyTree | None = None,
    variables: Mapping[str, PyTree] | None = None,
) -> TrainState:
    """A train state at step 0, for a `Model` and its variables, or a linen module to initialise.

    Args:
      model: a `jaxprune.Model` (then `variables` are required), or a flax.linen module
        (initialised here, called as `Model.linen` finds it).
      tx: the optimizer, e.g. from `make_optimizer`.
      rng: a PRNG key (typed or raw); split into init, dropout-init and state keys.
      example_input: a batch whose shape (any batch size) fixes the parameter shapes.
      masks: optional per-channel gate vectors stored in the state (see `TrainState`).
      variables: the model's variables (``{"params": ..., ...}``); for a module, they replace
        the initialised ones.

    Returns:
      A `TrainState` at step 0.
    """
    key = jax.random.wrap_key_data(_as_key_data(rng))
    init_key, dropout_key, state_key = jax.random.split(key, 3)
    if not isinstance(model, Model):
        module = model
        if variables is None:
            eval_kwargs = Model.linen(module, example_input).eval_kwargs
            init = jax.jit(lambda rngs, x: module.init(rngs, x, **eval_kwargs))
            variables = init({"params": init_key, "dropout": dropout_key}, example_input)
        model = Model.linen(module, example_input, variables=variables)
    if variables is None:
        raise ValueError("create_train_state with a Model needs its variables=.")
    variables = dict(variables)
    params = variables.pop("params")
    variables.pop("masks", None)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        collections=variables,
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_key),
        model=model,
        tx=tx,
        masks=masks,
    )


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("constant", "cosine", "step")
_WEIGHT_DECAY_TYPES = ("l2", "decoupled")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How parameters are updated. JSON-serialisable with `dataclasses.asdict`."""

    # "sgd" (with `momentum` and `nesterov`) or "adam".
    name: str = "sgd"
    # Peak learning rate: reached after warmup, then shaped by `schedule`.
    learning_rate: float = 0.1
    # SGD momentum; 0 gives plain SGD.
    momentum: float = 0.9
    # Nesterov momentum (SGD only).
    nesterov: bool = False
    # Adam moment decay rates and epsilon.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Weight decay coefficient; 0 disables it.
    weight_decay: float = 0.0
    # "l2": weight_decay * param is added to the gradient before momentum/Adam, what the pruning
    # papers used with SGD. "decoupled": it is added to the update after momentum/Adam and
    # scaled by the learning rate schedule (SGDW / AdamW).
    weight_decay_type: str = "l2"
    # Whether 1-D parameters (biases, BatchNorm scales and offsets) are decayed too.
    decay_biases_and_norms: bool = True
    # "constant", "cosine" (to `final_lr_fraction` of the peak) or "step" (see `decay_epochs`).
    schedule: str = "constant"
    # Epochs of linear warmup from 0 to `learning_rate`; may be fractional.
    warmup_epochs: float = 0.0
    # Step schedule: epochs (counted from the start of training) at which the learning rate is
    # multiplied by `decay_factor`.
    decay_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    # Cosine schedule: final learning rate as a fraction of the peak.
    final_lr_fraction: float = 0.0
    # Clip the global norm of the (trainable) gradients to this value; None disables it.
    grad_clip_norm: float | None = None


def _check_optimizer_config(config: OptimizerConfig) -> None:
    """Raises ValueError naming the first invalid field of an `OptimizerConfig`."""
    if config.name not in _OPTIMIZERS:
        raise ValueError(f"OptimizerConfig.name={config.name!r}; choose one of {_OPTIMIZERS}.")
    if config.schedule not in _SCHEDULES:
        raise ValueError(
            f"OptimizerConfig.schedule={config.schedule!r}; choose one of {_SCHEDULES}."
        )
    if config.weight_decay_type not in _WEIGHT_DECAY_TYPES:
        raise ValueError(
            f"OptimizerConfig.weight_decay_type={config.weight_decay_type!r}; choose one of "
            f"{_WEIGHT_DECAY_TYPES}."
        )
    if not config.learning_rate > 0:
        raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {config.learning_rate}.")
    if config.weight_decay < 0:
        raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {config.weight_decay}.")
    if not 0 <= config.momentum < 1:
        raise ValueError(f"OptimizerConfig.momentum must be in [0, 1), got {config.momentum}.")
    if config.nesterov and config.name != "sgd":
        raise ValueError("OptimizerConfig.nesterov applies to name='sgd' only; unset it.")
    if config.warmup_epochs < 0:
        raise ValueError(f"OptimizerConfig.warmup_epochs must be >= 0, got {config.warmup_epochs}.")
    if list(config.decay_epochs) != sorted(config.decay_epochs):
        raise ValueError(
            f"OptimizerConfig.decay_epochs must be increasing, got {config.decay_epochs}."
        )
    if config.decay_epochs and config.schedule != "step":
        raise ValueError(
            "OptimizerConfig.decay_epochs is only used by schedule='step'; set "
            f"schedule='step' or clear decay_epochs (schedule={config.schedule!r})."
        )
    if config.grad_clip_norm is not None and not config.grad_clip_norm > 0:
        raise ValueError(
            f"OptimizerConfig.grad_clip_norm must be > 0 or None, got {config.grad_clip_norm}."
        )


def make_schedule(config: OptimizerConfig, steps_per_epoch: int, epochs: float) -> optax.Schedule:
    """Builds the learning rate schedule of `config` as a function of the step.

    Args:
      config: the optimizer config.
      steps_per_epoch: optimizer steps in one epoch.
      epochs: length of training in epochs (the cosine schedule ends there).

    Returns:
      An optax schedule.
    """
    total_steps = max(1, round(steps_per_epoch * epochs))
    warmup_steps = round(steps_per_epoch * config.warmup_epochs)
    peak = config.learning_rate
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(
            peak, max(1, total_steps - warmup_steps), alpha=config.final_lr_fraction
        )
    else:
        # Boundaries are in epochs from the start of training; the joined schedule counts from
        # the end of warmup.
        boundaries = {
            round(epoch * steps_per_epoch) - warmup_steps: config.decay_factor
            for epoch in config.decay_epochs
        }
        main = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(
    config: OptimizerConfig,
    steps_per_epoch: int,
    epochs: float,
    *,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
    """Builds the optimizer described by `config`.

    The chain is: gradient clipping, L2 decay (``weight_decay_type="l2"``), SGD momentum or
    Adam, decoupled decay (``"decoupled"``), learning rate schedule.

    Args:
      config: the optimizer config.
      steps_per_epoch: optimizer steps in one epoch (for warmup and schedule boundaries).
      epochs: length of training in epochs.
      trainable: optional pytree of bools with the structure of the params (or a function of
        the params returning one); leaves marked False get a zero update and no optimizer
        state. They are split off before clipping, so frozen gradients never count in the
        global norm.

    Returns:
      An optax gradient transformation.

    Raises:
      ValueError: the config is invalid or `steps_per_epoch`/`epochs` are not positive.
    """
    _check_optimizer_config(config)
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch}; the training split is "
            "smaller than one batch, so lower the batch size."
        )
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}.")
    schedule = make_schedule(config, steps_per_epoch, epochs)
    decay_mask = None
    if not config.decay_biases_and_norms:
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    decay = (
        [optax.add_decayed_weights(config.weight_decay, mask=decay_mask)]
        if config.weight_decay > 0
        else []
    )
    parts: list[optax.GradientTransformation] = []
    if config.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay_type == "l2":
        parts += decay
    if config.name == "sgd":
        if config.momentum > 0:
            parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov))
    else:
        parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay_type == "decoupled":
        parts += decay
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx

    def labels(params: PyTree) -> PyTree:
        flags = trainable(params) if callable(trainable) else trainable
        return jax.tree.map(lambda flag: "trainable" if flag else "frozen", flags)

    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy of a batch's integer ``"label"``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def train_step(
    state: TrainState,
    batch: Batch,
    loss_fn: Callable[[Any, Batch], jax.Array] = cross_entropy,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch: the model's training call, `loss_fn`, the optimizer.

    Args:
      state: the train state.
      batch: ``{"image": model input, "label": int labels, ...}``.
      loss_fn: ``(model output, batch) -> scalar loss`` (static; default cross-entropy).

    Returns:
      The new state and ``{"loss", "accuracy", "grad_norm"}`` (accuracy of the argmax
      against ``"label"`` when the batch has labels and the output is 2-D; the global norm of
      the gradients, so that a non-finite gradient is seen at the step that produced it even
      when the loss stayed finite).
    """
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def loss_of(params: PyTree) -> tuple[jax.Array, tuple[Any, Any]]:
        output, updates = state.model.train_apply(state.variables(params), batch["image"], step_key)
        return loss_fn(output, batch), (output, updates)

    (loss, (output, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    collections = {**state.collections, **{k: v for k, v in updates.items() if k != "masks"}}
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        collections=collections,
        opt_state=opt_state,
        rng=jax.random.key_data(next_key),
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if "label" in batch and getattr(output, "ndim", 0) == 2:
        metrics["accuracy"] = jnp.mean(jnp.argmax(output, -1) == batch["label"])
    else:
        metrics["accuracy"] = jnp.zeros(())
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("model",))
def eval_step(model: Model, variables: PyTree, batch: Batch) -> dict[str, jax.Array]:
    """Sums of evaluation statistics over a batch, for exact aggregation over a split.

    Args:
      model: how the model is called (its evaluation call).
      variables: its variables.
      batch: ``{"image", "label"}`` and optionally ``"weight"`` (1 for real examples, 0 for
        padding), so that a padded last batch counts each real example once.

    Returns:
      ``loss_sum`` (float), ``correct`` and ``count`` (int32) and ``confusion``: an int32
      ``[num_classes, num_classes]`` matrix with true labels on rows and predictions on
      columns.
    """
    logits = model(variables, batch["image"])
    labels = batch["label"]
    weight = batch.get("weight", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
    num_classes = logits.shape[-1]
    predictions = jnp.argmax(logits, -1)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # One-hot product instead of a scatter: exact for counts below 2**24, and it shards cleanly.
    true_onehot = jax.nn.one_hot(labels, num_classes) * weight[:, None]
    confusion = true_onehot.T @ jax.nn.one_hot(predictions, num_classes)
    return {
        "loss_sum": jnp.sum(losses * weight),
        "correct": jnp.sum((predictions == labels) * weight).astype(jnp.int32),
        "count": jnp.sum(weight).astype(jnp.int32),
        "confusion": jnp.round(confusion).astype(jnp.int32),
    }


def cohen_kappa(confusion: jax.Array | np.ndarray) -> jax.Array:
    """Cohen's kappa of a confusion matrix: agreement beyond chance.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o = trace(C) / n`` the observed agreement and
    ``p_e = sum_k rows_k * cols_k / n**2`` the agreement expected from the marginals.

    Args:
      confusion: ``[K, K]`` counts, true labels on rows, predictions on columns.

    Returns:
      A float scalar in [-1, 1]. When chance agreement is already total (``p_e == 1``: a
      single class in both labels and predictions) kappa is undefined and 0 is returned.
    """
    confusion = jnp.asarray(confusion, jnp.float32)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {confusion.shape}.")
    total = jnp.maximum(confusion.sum(), 1.0)
    observed = jnp.trace(confusion) / total
    expected = jnp.sum(confusion.sum(0) * confusion.sum(1)) / total**2
    undefined = expected >= 1.0
    return jnp.where(
        undefined, 0.0, (observed - expected) / jnp.where(undefined, 1.0, 1 - expected)
    )


# ---------------------------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    """Pads a batch to `size` examples and adds a 0/1 ``"weight"`` marking the real ones."""
    count = len(batch["label"])
    weight = np.zeros(size, np.float32)
    weight[:count] = 1.0
    padded = {"weight": weight}
    if count == size:  # nothing to pad: a global batch of a multi-process run stays on device
        return {**batch, "weight": weight}
    for name, value in to_host(dict(batch)).items():
        pad = [(0, size - count)] + [(0, 0)] * (value.ndim - 1)
        padded[name] = np.pad(value, pad)
    return padded


def evaluate(
    model: Model,
    variables: PyTree,
    batches: Iterable[Batch],
    *,
    mesh: Mesh | None = None,
    preprocess: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and Cohen's kappa over every example of `batches`, each counted once.

    Every batch is padded to the size of the largest one seen so far (and to a multiple of
    the device count), with zero weight on the padding, so a short last batch reuses the
    compiled step and is still counted exactly.

    Args:
      model: how the model is called (its evaluation call).
      variables: its variables (a train state's are ``state.variables()``).
      batches: host batches ``{"image", "label"}``.
      mesh: devices to shard over; default: every device (of every process).
      preprocess: optional jitted function applied to each sharded batch before the model
        (e.g. normalisation of uint8 images); it must keep ``"label"`` and ``"weight"``.

    Returns:
      ``{"loss", "accuracy", "kappa", "count"}``.

    Raises:
      ValueError: `batches` is empty.
    """
    mesh = mesh or make_mesh()
    loss_sum, correct, count, confusion = 0.0, 0, 0, None
    padded_size = 0
    for batch in batches:
        size = len(batch["label"])
        padded_size = max(padded_size, math.ceil(size / mesh.size) * mesh.size)
        device_batch = shard_batch(_pad_batch(batch, padded_size), mesh)
        if preprocess is not None:
            device_batch = preprocess(device_batch)
        sums = jax.device_get(eval_step(model, variables, device_batch))
        loss_sum += float(sums["loss_sum"])
        correct += int(sums["correct"])
        count += int(sums["count"])
        batch_confusion = np.asarray(sums["confusion"], np.int64)
        confusion = batch_confusion if confusion is None else confusion + batch_confusion
    if confusion is None or count == 0:
        raise ValueError("evaluate got no examples; check the split and the batch size.")
    return {
        "loss": loss_sum / count,
        "accuracy": correct / count,
        "kappa": float(cohen_kappa(confusion)),
        "count": count,
    }
