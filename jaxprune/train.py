"""Training: the train state, optimizers, jitted train/eval steps, data parallelism and the loop.

The pieces follow the Flax examples: `create_train_state` builds a `TrainState`, `train_step` and
`eval_step` are jitted pure functions of (state, batch), and `train_and_evaluate` is a short loop
around them that logs, checkpoints and resumes.

Data parallelism uses `jax.sharding`: a 1-D mesh over every local device (axis ``"data"``), the
batch split along its leading axis, the state replicated. The jitted steps are written for one
global batch; XLA inserts the gradient all-reduce, so the same code runs on 1 or N devices.

Example:
  >>> from jaxprune import data, train
  >>> config = train.TrainConfig(model="lenet5", data=data.DataConfig(batch_size=128), epochs=5)
  >>> results = train.train_and_evaluate(config, "/tmp/lenet5")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxprune import data as data_lib
from jaxprune import ops
from jaxprune.model import Model
from jaxprune.models import build_model, widths_from_params

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


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D mesh with axis ``"data"`` over `devices` (default: every local device)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("make_mesh needs at least one device.")
    return Mesh(np.asarray(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError when `batch_size` does not split evenly over the mesh's devices."""
    if batch_size % mesh.size:
        lower = batch_size - batch_size % mesh.size
        choices = f"{lower} or {lower + mesh.size}" if lower else str(mesh.size)
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh; "
            f"use a multiple of {mesh.size} (e.g. {choices})."
        )


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along its leading (batch) axis.

    Args:
      batch: a dict of arrays with the same leading dimension.
      mesh: a mesh from `make_mesh`.

    Returns:
      The batch as global arrays sharded with ``NamedSharding(mesh, P("data"))``.

    Raises:
      ValueError: the batch size is not divisible by the number of devices.
    """
    sizes = {np.shape(value)[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}.")
    check_batch_size(sizes.pop(), mesh)
    return jax.device_put(dict(batch), NamedSharding(mesh, P("data")))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of `tree` on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    """Pads a batch to `size` examples and adds a 0/1 ``"weight"`` marking the real ones."""
    count = len(batch["label"])
    weight = np.zeros(size, np.float32)
    weight[:count] = 1.0
    padded = {"weight": weight}
    for name, value in batch.items():
        value = np.asarray(value)
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
      mesh: devices to shard over; default: every local device.
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


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. JSON-serialisable with `dataclasses.asdict`; see `from_dict`."""

    # Zoo model name (see `jaxprune.models.MODELS`).
    model: str = "lenet5"
    # Width spec {layer path: output features}; None: the model's default widths.
    widths: dict[str, int] | None = None
    # Dataset, batch size and data order seed.
    data: data_lib.DataConfig = dataclasses.field(default_factory=data_lib.DataConfig)
    # Optimizer and learning rate schedule.
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    # Number of passes over the training split.
    epochs: int = 5
    # Seed of parameter initialisation and dropout.
    seed: int = 0
    # Save a checkpoint every this many steps (and always at the end of an epoch).
    checkpoint_every_steps: int = 500
    # How many of the latest checkpoints to keep.
    keep_checkpoints: int = 3
    # Write a training metrics line every this many steps.
    log_every_steps: int = 50
    # Batch size of evaluation (the last, smaller batch is padded, not dropped).
    eval_batch_size: int = 500
    # Continue from the latest checkpoint of the workdir when there is one.
    resume: bool = True
    # Show a progress bar on stderr.
    progress: bool = True
    # Start from the variables of this model file (`checkpoint.save_model_file`), e.g. a pruned
    # model to fine-tune, instead of a random initialisation; its widths must match `widths`.
    init_from: str | None = None
    # Convolution implementation of the model (`jaxprune.ops.conv_impl`): "auto", "xla" or
    # "gemm". It changes the speed of a step, not its results, so a resume may change it.
    conv_impl: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuilds a config from `to_dict` output (e.g. read back from JSON)."""
        return _dataclass_from_dict(cls, values)


def _dataclass_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Builds dataclass `cls` from nested dicts, turning JSON lists back into tuples."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no fields {unknown}; valid fields are {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _dataclass_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _flatten_dict(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key != "widths":
            flat.update(_flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics lines written after checkpoint `step`, so a resumed run writes each once.

    Logs and validation evaluations of step `step` precede its checkpoint and are kept; the
    test evaluation follows the last checkpoint, so it is always redone.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record["step"] < step or (record["step"] == step and record.get("split") != "test"):
            kept.append(line)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    temporary.replace(path)


class _MetricsLog:
    """Appends JSON lines with step, epoch and wall time to ``workdir/metrics.jsonl``."""

    def __init__(self, path: Path, steps_per_epoch: int) -> None:
        self._file = path.open("a")
        self._steps_per_epoch = steps_per_epoch
        self._start = time.time()

    def write(self, step: int, **values: Any) -> dict[str, Any]:
        now = time.time()
        record = {
            "step": step,
            "epoch": step / self._steps_per_epoch,
            **values,
            "time": now,
            "elapsed_s": now - self._start,
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()


class _StepMetrics:
    """Reads train-step metrics one step late, checks them, and averages them for the log.

    Reading a step's metrics only after the next step is dispatched keeps the host from
    waiting on the device; a NaN is still caught before the state holding it is saved, as
    long as `check` runs before every save.
    """

    def __init__(self, bar: tqdm, learning_rate: float) -> None:
        self._bar = bar
        self._learning_rate = learning_rate
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self._sums = {"loss": 0.0, "accuracy": 0.0}
        self._count = 0
        self.last_saved: int | None = None

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.check()
        self._pending.append((step, metrics))
        self._bar.update(1)

    def check(self) -> None:
        for step, metrics in self._pending:
            loss, accuracy, grad_norm = (
                float(metrics[name]) for name in ("loss", "accuracy", "grad_norm")
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                saved = (
                    f"the last checkpoint (step {self.last_saved}) is kept"
                    if self.last_saved is not None
                    else "no checkpoint was saved"
                )
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {loss}, gradient norm "
                    f"{grad_norm}); stopped before saving that state ({saved}). Lower the "
                    f"learning rate (optimizer.learning_rate={self._learning_rate}), add warmup "
                    "(optimizer.warmup_epochs) or clip gradients (optimizer.grad_clip_norm)."
                )
            self._sums["loss"] += loss
            self._sums["accuracy"] += accuracy
            self._count += 1
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)
        self._pending.clear()

    def take_means(self) -> dict[str, float]:
        """Means since the last call, over checked steps (call `check` first)."""
        means = {name: total / max(self._count, 1) for name, total in self._sums.items()}
        self._sums = {"loss": 0.0, "accuracy": 0.0}
        self._count = 0
        return means


# Config fields whose change makes a stored step map to another batch: resuming is refused.
_POSITION_FIELDS = (
    "data.name",
    "data.batch_size",
    "data.train_examples",
    "data.validation_size",
    "data.validation_seed",
)
# Config fields that do not affect the run's result: changing them needs no warning.
_COSMETIC_FIELDS = ("progress", "resume", "conv_impl")


def _check_resumable(
    where: str,
    meta: Mapping[str, Any],
    config: TrainConfig,
    num_classes: int,
    widths: Mapping[str, int],
) -> None:
    """Refuses to continue a checkpoint of another model; warns about other config changes."""
    from jaxprune.checkpoint import CheckpointError  # checkpoint.py imports this module

    stored_model = meta.get("model_name")
    if stored_model != config.model or meta.get("num_classes") != num_classes:
        raise CheckpointError(
            f"checkpoint {where} holds {stored_model!r} with {meta.get('num_classes')} "
            f"classes, but the config asks for {config.model!r} with {num_classes}; use "
            "another workdir or set the config back."
        )
    stored_widths = meta.get("widths", {})
    if dict(stored_widths) != dict(widths):
        differing = sorted(
            f"{layer}: stored {stored_widths.get(layer)}, config {widths.get(layer)}"
            for layer in set(stored_widths) | set(widths)
            if stored_widths.get(layer) != widths.get(layer)
        )
        raise CheckpointError(
            f"checkpoint {where} holds {stored_model!r} with other widths than the config: "
            f"{'; '.join(differing)}. Use another workdir or set TrainConfig.widths to the "
            "stored widths."
        )
    stored = _flatten_dict(meta.get("config") or {})
    current = _flatten_dict(config.to_dict())
    changed = {
        key: (stored.get(key), current.get(key))
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key) and key not in _COSMETIC_FIELDS
    }
    position = [key for key in changed if key in _POSITION_FIELDS]
    if position:
        raise CheckpointError(
            f"checkpoint {where} was trained with other data settings ("
            + ", ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in position)
            + "); a step would not map to the same batch. Use another workdir or restore them."
        )
    if changed:
        described = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        warnings.warn(
            f"resuming checkpoint {where} with a changed config: {described}.", stacklevel=3
        )


def _start_from_file(state: TrainState, path: str) -> TrainState:
    """The state with its variables replaced by a model file's (fresh optimizer state)."""
    from jaxprune import checkpoint as ckpt  # checkpoint.py imports this module

    _, variables, _ = ckpt.load_model_file(path)
    have = jax.tree.map(jnp.shape, {"params": state.params, **state.collections})
    got = jax.tree.map(jnp.shape, dict(variables))
    if have != got:
        raise ValueError(
            f"TrainConfig.init_from={path} holds variables of other shapes than the configured "
            "model; set TrainConfig.widths to the file's width spec (widths_from_params)."
        )
    variables = dict(variables)
    params = variables.pop("params")
    return state.replace(params=params, collections=variables, opt_state=state.tx.init(params))


def _restore_or_create(
    manager: Any,
    config: TrainConfig,
    model: Any,
    tx: optax.GradientTransformation,
    num_classes: int,
    input_shape: tuple[int, ...],
    mesh: Mesh,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """The latest checkpoint's state and history, or a fresh state; replicated on the mesh."""
    from jaxprune import checkpoint as ckpt  # checkpoint.py imports this module

    last_saved = manager.latest_step()
    if last_saved is None:
        example = jnp.zeros((1, *input_shape), jnp.float32)
        state = create_train_state(model, tx, jax.random.key(config.seed), example)
        if config.init_from:
            state = _start_from_file(state, config.init_from)
        return replicate(state, mesh), []
    if not config.resume:
        raise ValueError(
            f"{manager.directory} already holds checkpoints (latest step {last_saved}) and "
            "TrainConfig.resume is False; use a fresh workdir or set resume=True."
        )
    meta = ckpt.restore_meta(manager, last_saved)
    target = ckpt.abstract_train_state(model, tx, input_shape)
    where = f"{Path(manager.directory) / str(last_saved)}"
    _check_resumable(where, meta, config, num_classes, widths_from_params(target.params))
    restored = ckpt.restore_checkpoint(
        manager, step=last_saved, target=target, sharding=NamedSharding(mesh, P())
    )
    return restored.state, list(meta["history"])


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, *, dataset: Any = None
) -> dict[str, Any]:
    """Trains a zoo model, resuming from the latest checkpoint in `workdir`.

    Writes ``workdir/metrics.jsonl`` (a line per log step and per evaluation) and
    ``workdir/checkpoints`` (every `checkpoint_every_steps` steps and at each epoch end).
    Running the same command again continues where the last checkpoint left off, mid-epoch
    included, and reaches the same parameters as an uninterrupted run.

    Args:
      config: the run.
      workdir: folder of the run's checkpoints and metrics.
      dataset: the data, as a `jaxprune.data.Dataset` or an object with the same ``iterate``,
        ``num_batches``, ``preprocess``, ``num_classes`` and ``image_shape``; default:
        ``jaxprune.data.load(config.data)``. A hook for tests and custom data.

    Returns:
      ``{"step", "validation": {...}, "test": {...}}`` with loss, accuracy, kappa and count
      of the last validation and of the final test evaluation.

    Raises:
      FloatingPointError: the loss or the gradients became NaN or infinite.
      CheckpointError: the workdir holds a checkpoint of another model or a broken one.
      ValueError: invalid config (e.g. a batch size not divisible by the device count).
    """
    from jaxprune import checkpoint as ckpt  # checkpoint.py imports this module

    for name in ("epochs", "checkpoint_every_steps", "log_every_steps", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(config, name)}.")
    if config.conv_impl != "auto" and config.conv_impl not in ops.CONV_IMPLS:
        raise ValueError(
            f"TrainConfig.conv_impl {config.conv_impl!r} is unknown; use 'auto' or one of "
            f"{', '.join(ops.CONV_IMPLS)}."
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = dataset if dataset is not None else data_lib.load(config.data)
    batch_size = config.data.batch_size
    mesh = make_mesh()
    check_batch_size(batch_size, mesh)
    steps_per_epoch = dataset.num_batches("train", batch_size, drop_remainder=True)
    input_shape = tuple(dataset.image_shape)
    model = build_model(
        config.model, dataset.num_classes, config.widths, conv_impl=config.conv_impl
    )
    tx = make_optimizer(config.optimizer, steps_per_epoch, config.epochs)
    schedule = make_schedule(config.optimizer, steps_per_epoch, config.epochs)
    spec = ckpt.RunSpec(
        config.model,
        dataset.num_classes,
        input_shape,
        config.optimizer,
        steps_per_epoch,
        config.epochs,
    )

    def preprocess_eval(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images, _ = dataset.preprocess(batch["image"], batch["label"], train=False)
        return {**batch, "image": images}

    def evaluate_split(state: TrainState, split: str) -> dict[str, float]:
        batches = dataset.iterate(
            split, config.eval_batch_size, shuffle=False, drop_remainder=False
        )
        return evaluate(
            state.model, state.variables(), batches, mesh=mesh, preprocess=preprocess_eval
        )

    manager = ckpt.open_checkpoints(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints, cleanup_tmp=True
    )
    log = None
    try:
        state, history = _restore_or_create(
            manager, config, model, tx, dataset.num_classes, input_shape, mesh
        )
        step = int(state.step)
        _truncate_metrics(workdir / "metrics.jsonl", step)
        log = _MetricsLog(workdir / "metrics.jsonl", steps_per_epoch)
        bar = tqdm(
            total=steps_per_epoch * config.epochs,
            initial=step,
            unit="step",
            disable=not config.progress,
            dynamic_ncols=True,
        )
        step_metrics = _StepMetrics(bar, config.optimizer.learning_rate)
        step_metrics.last_saved = manager.latest_step()
        with bar:
            for epoch in range(step // steps_per_epoch, config.epochs):
                start_batch = step - epoch * steps_per_epoch
                batches = dataset.iterate(
                    "train",
                    batch_size,
                    seed=config.data.seed,
                    epoch=epoch,
                    shuffle=True,
                    drop_remainder=True,
                    start_batch=start_batch,
                )
                for batch_index, batch in enumerate(batches, start=start_batch):
                    batch = shard_batch(batch, mesh)
                    key = data_lib.augmentation_key(config.data.seed, epoch, batch_index)
                    images, labels = dataset.preprocess(
                        batch["image"], batch["label"], key, train=True
                    )
                    state, metrics = train_step(state, {"image": images, "label": labels})
                    step += 1
                    step_metrics.add(step, metrics)
                    end_of_epoch = batch_index + 1 == steps_per_epoch
                    save_now = end_of_epoch or step % config.checkpoint_every_steps == 0
                    log_now = step % config.log_every_steps == 0
                    if log_now or save_now:
                        step_metrics.check()
                    if log_now:
                        lr = float(schedule(step - 1))
                        log.write(step, kind="train", **step_metrics.take_means(), learning_rate=lr)
                    if end_of_epoch:
                        validation = evaluate_split(state, "validation")
                        history.append(
                            log.write(step, kind="eval", split="validation", **validation)
                        )
                        if config.progress:
                            bar.write(
                                f"epoch {epoch + 1}/{config.epochs}: validation "
                                f"loss {validation['loss']:.4f}, "
                                f"accuracy {validation['accuracy']:.4f}"
                            )
                    if save_now:
                        ckpt.save_checkpoint(
                            manager, state, spec, config=config.to_dict(), history=history
                        )
                        step_metrics.last_saved = step
            step_metrics.check()
        test = evaluate_split(state, "test")
        log.write(step, kind="eval", split="test", **test)
        if history:
            validation = {k: history[-1][k] for k in ("loss", "accuracy", "kappa", "count")}
        else:
            validation = evaluate_split(state, "validation")
        return {"step": step, "validation": validation, "test": test}
    finally:
        if log is not None:
            log.close()
        manager.wait_until_finished()
        manager.close()


def fine_tune(
    model: str,
    model_file: str | Path,
    data_config: data_lib.DataConfig,
    workdir: str | Path,
    *,
    epochs: int = 1,
    learning_rate: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tunes a (pruned) model file with SGD (momentum 0.9, cosine, weight decay 5e-4).

    Resumable like `train_and_evaluate` (checkpoints in `workdir`).

    Args:
      model: the zoo name of the model in `model_file`.
      model_file: the starting variables (`checkpoint.save_model_file`); their width spec is
        the model's.
      data_config: the training data.
      workdir: checkpoints and metrics of the fine-tuning.
      epochs: passes over the training split.
      learning_rate: the peak learning rate.
      seed: data order and dropout seed.

    Returns:
      The fine-tuned variables ``{"params", ...}`` (every collection).
    """
    from jaxprune import checkpoint as ckpt  # checkpoint.py imports this module

    _, variables, _ = ckpt.load_model_file(model_file)
    config = TrainConfig(
        model=model,
        widths=widths_from_params(variables["params"]),
        data=dataclasses.replace(data_config, seed=seed),
        optimizer=OptimizerConfig(
            name="sgd",
            learning_rate=learning_rate,
            momentum=0.9,
            schedule="cosine",
            weight_decay=5e-4,
        ),
        epochs=epochs,
        seed=seed,
        checkpoint_every_steps=100,
        init_from=str(model_file),
    )
    train_and_evaluate(config, workdir)
    with ckpt.open_checkpoints(Path(workdir) / "checkpoints") as manager:
        state = ckpt.restore_checkpoint(manager).state
    return {"params": state.params, **state.collections}
