"""The training job: train a zoo model on a dataset, resumable from its workdir.

`train_and_evaluate(config, workdir)` is the short loop of the Flax examples around
`train.train_step` and `train.evaluate`, kept in a run directory (`jaxprune.run.RunDir`, kind
"train"): a checkpoint every `checkpoint_every_steps` steps and at each epoch end, metrics as
JSON lines, and a rerun of the same config that continues where the last checkpoint left off,
mid-epoch included, and reaches the same parameters as an uninterrupted run. A rerun with
another config in the same workdir is refused with the changed fields named.

Example:
  >>> from jaxprune import data, train, train_job
  >>> config = train_job.TrainConfig(model="lenet5", data=data.DataConfig(batch_size=128))
  >>> results = train_job.train_and_evaluate(config, "/tmp/lenet5")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxprune import checkpoint as ckpt
from jaxprune import data as data_lib
from jaxprune import ops
from jaxprune.fit import DivergenceError
from jaxprune.models import build_model, widths_from_params
from jaxprune.run import Checkpoints, RunDir, config_identity
from jaxprune.sharding import check_batch_size, make_mesh, replicate, shard_batch
from jaxprune.train import (
    OptimizerConfig,
    TrainState,
    create_train_state,
    evaluate,
    make_optimizer,
    make_schedule,
    train_step,
)

# Config fields that do not change a run's result: a rerun may change them and resume.
COSMETIC_FIELDS = (
    "progress",
    "resume",
    "conv_impl",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "eval_batch_size",
)
CHECKPOINTS = "train"


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
    # Layers (top-level names, e.g. ("head",)) that keep their fresh initialisation instead of
    # `init_from`'s values: a pretrained model fine-tuned on a dataset with other classes (an
    # ImageNet VGG-16 from `jaxprune import-weights`, trained on Birds-200 with a new head).
    init_fresh: tuple[str, ...] = ()
    # Convolution implementation of the model (`jaxprune.ops.conv_impl`): "auto", "xla" or
    # "gemm". It changes the speed of a step, not its results, so a resume may change it.
    conv_impl: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuilds a config from `to_dict` output (e.g. read back from JSON)."""
        return dataclass_from_dict(cls, values)

    def check(self) -> None:
        """Raises ValueError naming the first invalid field, before any work."""
        for name in ("epochs", "checkpoint_every_steps", "log_every_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.keep_checkpoints < 1:
            raise ValueError(
                f"TrainConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}."
            )
        if self.conv_impl != "auto" and self.conv_impl not in ops.CONV_IMPLS:
            raise ValueError(
                f"TrainConfig.conv_impl {self.conv_impl!r} is unknown; use 'auto' or one of "
                f"{', '.join(ops.CONV_IMPLS)}."
            )
        if self.init_fresh and not self.init_from:
            raise ValueError(
                f"TrainConfig.init_fresh={list(self.init_fresh)} needs init_from (the model "
                "file the other layers come from)."
            )
        make_optimizer(self.optimizer, 1, 1.0)  # validates the optimizer


def dataclass_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
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
            value = dataclass_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


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
                    f"the checkpoint of step {self.last_saved} is kept"
                    if self.last_saved is not None
                    else "nothing was saved"
                )
                raise DivergenceError(
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


def _state_arrays(state: TrainState) -> dict[str, Any]:
    arrays = {
        "step": state.step,
        "params": state.params,
        "collections": state.collections,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }
    if state.masks is not None:
        arrays["masks"] = state.masks
    return arrays


def _start_from_file(state: TrainState, path: str, fresh: tuple[str, ...] = ()) -> TrainState:
    """The state with its variables replaced by a model file's (fresh optimizer state), except
    the layers named in `fresh`, which keep the state's own initialisation."""
    _, variables, _ = ckpt.load_model_file(path)
    current = {"params": state.params, **state.collections}
    unknown = sorted(set(fresh) - set(state.params))
    if unknown:
        raise ValueError(
            f"TrainConfig.init_fresh names {unknown}, which the model does not have; its layers "
            f"are {sorted(state.params)}."
        )

    def kept(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {
            name: {k: v for k, v in collection.items() if k not in fresh}
            for name, collection in tree.items()
        }

    have = jax.tree.map(jnp.shape, kept(current))
    got = jax.tree.map(jnp.shape, kept(dict(variables)))
    if have != got:
        raise ValueError(
            f"TrainConfig.init_from={path} holds variables of other shapes than the configured "
            "model; set TrainConfig.widths to the file's width spec (widths_from_params), and "
            "name in init_fresh the layers to initialise anew (e.g. a head of another class "
            "count)."
        )
    merged = {
        name: {**dict(collection), **kept(dict(variables)).get(name, {})}
        for name, collection in current.items()
    }
    params = merged.pop("params")
    return state.replace(params=params, collections=merged, opt_state=state.tx.init(params))


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, *, dataset: Any = None
) -> dict[str, Any]:
    """Trains a zoo model, resuming from the latest checkpoint in `workdir`.

    Writes ``workdir/metrics.jsonl`` (a line per log step and per evaluation) and checkpoints
    (every `checkpoint_every_steps` steps and at each epoch end). Running the same config again
    continues where the last checkpoint left off, mid-epoch included, and reaches the same
    parameters as an uninterrupted run.

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
      DivergenceError: the loss or the gradients became NaN or infinite.
      RunMismatchError: the workdir holds another run (the changed fields are named).
      CheckpointError: a broken checkpoint.
      ValueError: invalid config (e.g. a batch size not divisible by the device count).
    """
    config.check()
    workdir = Path(workdir)
    mesh = make_mesh()
    check_batch_size(config.data.batch_size, mesh)
    identity = {"config": config_identity(config, COSMETIC_FIELDS)}
    with RunDir.open(workdir, kind="train", identity=identity, fresh=not config.resume) as run:
        dataset = dataset if dataset is not None else data_lib.load(config.data)
        return _train(config, run, dataset, mesh)


def _train(config: TrainConfig, run: RunDir, dataset: Any, mesh: Any) -> dict[str, Any]:
    batch_size = config.data.batch_size
    steps_per_epoch = dataset.num_batches("train", batch_size, drop_remainder=True)
    input_shape = tuple(dataset.image_shape)
    module = build_model(
        config.model, dataset.num_classes, config.widths, conv_impl=config.conv_impl
    )
    tx = make_optimizer(config.optimizer, steps_per_epoch, config.epochs)
    schedule = make_schedule(config.optimizer, steps_per_epoch, config.epochs)
    example = jnp.zeros((1, *input_shape), jnp.float32)
    state = create_train_state(module, tx, jax.random.key(config.seed), example)
    if config.init_from:
        state = _start_from_file(state, config.init_from, tuple(config.init_fresh))
    checkpoints = run.checkpoints(CHECKPOINTS)
    history: list[dict[str, Any]] = []
    last_saved = checkpoints.latest_step()
    if last_saved is not None:
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state_arrays(state)
        )
        arrays, meta = checkpoints.restore(last_saved, target)
        state = state.replace(**arrays)
        history = list(meta["history"])
    state = replicate(state, mesh)
    step = int(state.step)
    log = run.metrics(resumed_step=step if last_saved is not None else None)
    start_time = time.time()
    model_meta = {
        "model_name": config.model,
        "num_classes": dataset.num_classes,
        "widths": widths_from_params(state.params),
        "input_shape": list(input_shape),
        "config": config.to_dict(),
    }

    def write(kind: str, **values: Any) -> dict[str, Any]:
        now = time.time()
        return log.write(
            step, kind, epoch=step / steps_per_epoch, **values, time=now, elapsed_s=now - start_time
        )

    def preprocess_eval(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images, _ = dataset.preprocess(batch["image"], batch["label"], train=False)
        return {**batch, "image": images}

    def evaluate_split(split: str) -> dict[str, float]:
        batches = dataset.iterate(
            split, config.eval_batch_size, shuffle=False, drop_remainder=False
        )
        return evaluate(
            state.model, state.variables(), batches, mesh=mesh, preprocess=preprocess_eval
        )

    bar = tqdm(
        total=steps_per_epoch * config.epochs,
        initial=step,
        unit="step",
        desc="training",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    step_metrics = _StepMetrics(bar, config.optimizer.learning_rate)
    step_metrics.last_saved = last_saved
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
                images, labels = dataset.preprocess(batch["image"], batch["label"], key, train=True)
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
                    write("train", **step_metrics.take_means(), learning_rate=lr)
                if end_of_epoch:
                    validation = evaluate_split("validation")
                    history.append(write("eval", split="validation", **validation))
                    if config.progress:
                        bar.write(
                            f"epoch {epoch + 1}/{config.epochs}: validation "
                            f"loss {validation['loss']:.4f}, "
                            f"accuracy {validation['accuracy']:.4f}"
                        )
                if save_now:
                    meta = {**model_meta, "step": step, "history": history}
                    checkpoints.save(step, _state_arrays(state), meta)
                    step_metrics.last_saved = step
        step_metrics.check()
    test = evaluate_split("test")
    write("eval", split="test", **test)
    if history:
        validation = {k: history[-1][k] for k in ("loss", "accuracy", "kappa", "count")}
    else:
        validation = evaluate_split("validation")
    return {"step": step, "validation": validation, "test": test}


def latest_state(workdir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays of the latest checkpoint of a training workdir (``step``, ``params``,
    ``collections``, ``opt_state``, ``rng``) and its meta.

    Raises:
      CheckpointError: no checkpoint, or a broken one.
    """
    checkpoints = Checkpoints(Path(workdir) / "checkpoints" / CHECKPOINTS)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise ckpt.CheckpointError(
                f"{workdir} holds no training checkpoint; run `jaxprune train` there first."
            )
        meta = checkpoints.meta(step)
        config = TrainConfig.from_dict(meta["config"])
        module = build_model(meta["model_name"], meta["num_classes"], meta["widths"])
        tx = make_optimizer(config.optimizer, 1, config.epochs)
        example = jax.ShapeDtypeStruct((1, *meta["input_shape"]), jnp.float32)
        abstract = jax.eval_shape(
            lambda x: _state_arrays(create_train_state(module, tx, jax.random.key(0), x)), example
        )
        return checkpoints.restore(step, abstract)
    finally:
        checkpoints.close()


def latest_variables(workdir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variables (every collection) of the latest checkpoint of a training workdir, and
    its meta (see `latest_state`)."""
    arrays, meta = latest_state(workdir)
    return {"params": arrays["params"], **arrays["collections"]}, meta


def export_latest(
    workdir: str | Path, path: str | Path, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Writes the latest checkpoint of a training workdir as a single model file.

    Args:
      workdir: a `train_and_evaluate` workdir.
      path: the model file to write.
      meta: extra JSON-serialisable description, merged over the one taken from the
        checkpoint (step, config, history).

    Returns:
      The path written.

    Raises:
      CheckpointError: no checkpoint in the workdir, or a broken one.
    """
    variables, stored = latest_variables(workdir)
    described = {
        "step": stored["step"],
        "config": stored["config"],
        "history": stored["history"],
        **(meta or {}),
    }
    return ckpt.save_model_file(
        path,
        model_name=stored["model_name"],
        num_classes=stored["num_classes"],
        widths=stored["widths"],
        variables=variables,
        meta=described,
        input_shape=stored["input_shape"],
    )


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
    """Fine-tunes a (pruned) zoo model file with SGD (momentum 0.9, cosine, weight decay 5e-4).

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
      The fine-tuned variables (every collection).
    """
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
    tuned, _ = latest_variables(workdir)
    return tuned
