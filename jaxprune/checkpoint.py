"""Checkpoints of training runs (orbax) and single-file model artifacts (msgpack).

A checkpoint directory holds one orbax step directory per saved step, each with two items:

- ``state``: the arrays of a `TrainState` (params, collections, opt_state, step, rng, masks),
  saved with orbax's standard handler;
- ``meta``: a JSON document with what is needed to rebuild the state's structure (model name,
  number of classes, width spec, example input shape, optimizer config), the run's config and
  history, free-form extras (e.g. keep indices), and the shape, dtype and SHA-256 of every
  array.

Restoring never trusts the files blindly: the target tree is built from the stored spec (or
given by the caller), compared array by array with the stored listing, and the restored
arrays are checked against their hashes. Any difference raises `CheckpointError` naming the
checkpoint and what differs; there is no partial restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from jaxprune.models import build_model, widths_from_params
from jaxprune.runtime import is_main_process
from jaxprune.train import OptimizerConfig, TrainState, create_train_state, make_optimizer
from jaxprune.tree_paths import key_name

PyTree = Any

CHECKPOINT_FORMAT = "jaxprune-checkpoint"
MODEL_FILE_FORMAT = "jaxprune-model"
FORMAT_VERSION = 1
# How many differences an error message lists before summarising the rest.
_MAX_LISTED = 8


class CheckpointError(Exception):
    """A checkpoint or model file is missing, unreadable, corrupted or of another model."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What, besides the arrays, is needed to rebuild a run's `TrainState`."""

    # Zoo model name, as accepted by `jaxprune.models.build_model`.
    model_name: str
    # Outputs of the logits layer.
    num_classes: int
    # Shape of one input example, without the batch axis, e.g. (28, 28, 1).
    input_shape: tuple[int, ...]
    # The optimizer; its state structure is part of the checkpoint.
    optimizer: OptimizerConfig
    # Schedule length: steps per epoch and number of epochs.
    steps_per_epoch: int
    epochs: float


class Restored(NamedTuple):
    """A restored checkpoint: the state, its model and the stored JSON document."""

    state: TrainState
    model: Any
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Array listings: names, shapes, dtypes, hashes
# ---------------------------------------------------------------------------------------------


def _named_leaves(tree: PyTree) -> dict[str, Any]:
    """Returns ``{"params/conv1/kernel": leaf, ...}`` for every array leaf of `tree`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(key_name(k) for k in path): leaf for path, leaf in leaves}


def tree_fingerprint(tree: PyTree) -> str:
    """SHA-256 of a tree's arrays (paths, dtypes, shapes and bytes).

    Runs store it to recognise the model (or the data) a workdir was started from, and refuse to
    resume on another.
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def json_default(value: Any) -> Any:
    """`json.dumps` fallback for NumPy and JAX arrays and NumPy scalars."""
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _flatten_config(values: Mapping[str, Any], whole: Collection[str], prefix: str = "") -> dict:
    """Nested config dicts as {"optimizer.lr": ...}; the fields named in `whole` stay whole."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key not in whole:
            flat.update(_flatten_config(value, whole, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(
    where: str | os.PathLike,
    *,
    stored_fingerprint: str | None,
    fingerprint: str,
    stored_config: Mapping[str, Any],
    config: Mapping[str, Any],
    config_name: str,
    ignore: Collection[str] = (),
    whole: Collection[str] = (),
) -> None:
    """Refuses to resume a method's checkpoint that another run (base variables or config) made.

    Args:
      where: the checkpoint, named in the errors.
      stored_fingerprint: the `tree_fingerprint` of the base variables the checkpoint records.
      fingerprint: that of the base variables of this run.
      stored_config: the config the checkpoint records, as nested dicts.
      config: this run's config, as nested dicts.
      config_name: the config's class name, for the error (e.g. "IterativeConfig").
      ignore: flattened field names that do not change a run's result (e.g. "progress").
      whole: fields holding dicts that are compared whole, not key by key.

    Raises:
      CheckpointError: other base variables, or fields that differ, each named with its
        stored and current values.
    """
    if stored_fingerprint != fingerprint:
        raise CheckpointError(
            f"checkpoint {where} belongs to a run that started from other base variables; use "
            "another workdir for this model."
        )
    stored = _flatten_config(stored_config, whole)
    current = _flatten_config(config, whole)
    changed = sorted(
        key
        for key in set(stored) | set(current)
        if stored.get(key) != current.get(key) and key not in ignore
    )
    if changed:
        described = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"checkpoint {where} was made with another {config_name} ({described}); use "
            "another workdir, or set the config back to resume."
        )


def _array_hash(value: Any) -> str:
    array = np.ascontiguousarray(np.asarray(value))
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def array_listing(tree: PyTree, *, with_hashes: bool) -> dict[str, dict[str, Any]]:
    """Shape, dtype and (optionally) SHA-256 of every array of `tree`, by name."""
    listing = {}
    for name, leaf in _named_leaves(tree).items():
        entry: dict[str, Any] = {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name}
        if with_hashes:
            entry["sha256"] = _array_hash(leaf)
        listing[name] = entry
    return listing


def _describe_differences(
    stored: Mapping[str, Any], expected: Mapping[str, Any], *, dtypes: bool = True
) -> list[str]:
    """Lists how a stored array listing differs from the one a target expects (names, shapes
    and, with `dtypes`, dtypes)."""
    differences = []
    for name in expected:
        if name not in stored:
            differences.append(f"{name}: expected but missing")
    for name in stored:
        if name not in expected:
            differences.append(f"{name}: stored but not expected")
    for name in expected:
        if name in stored:
            s, e = stored[name], expected[name]
            same_dtype = s["dtype"] == e["dtype"] or not dtypes
            if list(s["shape"]) != list(e["shape"]) or not same_dtype:
                differences.append(
                    f"{name}: stored {s['dtype']}{list(s['shape'])}, "
                    f"expected {e['dtype']}{list(e['shape'])}"
                )
    return differences


def _summarise(differences: Sequence[str]) -> str:
    listed = "\n  ".join(differences[:_MAX_LISTED])
    more = len(differences) - _MAX_LISTED
    return listed + (f"\n  ... and {more} more" if more > 0 else "")


def check_listing(
    where: str, stored: Mapping[str, Any], expected: Mapping[str, Any], *, dtypes: bool = True
) -> None:
    """Raises `CheckpointError` when a stored listing does not match the expected arrays."""
    differences = _describe_differences(stored, expected, dtypes=dtypes)
    if differences:
        raise CheckpointError(
            f"{where} does not match the expected model ({len(differences)} differences):\n  "
            f"{_summarise(differences)}\nIt was saved from another architecture (model or "
            "widths); restore it with its own spec, or start from a fresh directory."
        )


def check_hashes(where: str, stored: Mapping[str, Any], tree: PyTree) -> None:
    corrupted = [
        name
        for name, leaf in _named_leaves(tree).items()
        if stored[name].get("sha256") != _array_hash(leaf)
    ]
    if corrupted:
        raise CheckpointError(
            f"{where} is corrupted: {len(corrupted)} arrays differ from the hashes recorded "
            f"when it was saved:\n  {_summarise(corrupted)}\nDelete it and use an earlier one."
        )


def _masks_spec(masks: PyTree | None) -> Any:
    """JSON description of the masks' structure (nested dicts of shape/dtype), or None."""
    if masks is None:
        return None
    as_dict = serialization.to_state_dict(masks)
    return jax.tree.map(
        lambda leaf: {"shape": list(leaf.shape), "dtype": np.dtype(leaf.dtype).name}, as_dict
    )


def _masks_target(spec: Any) -> PyTree | None:
    if spec is None:
        return None
    is_entry = lambda node: isinstance(node, dict) and set(node) == {"shape", "dtype"}
    return jax.tree.map(
        lambda entry: jax.ShapeDtypeStruct(tuple(entry["shape"]), np.dtype(entry["dtype"])),
        spec,
        is_leaf=is_entry,
    )


# ---------------------------------------------------------------------------------------------
# Run checkpoints (orbax)
# ---------------------------------------------------------------------------------------------


def open_checkpoints(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3, cleanup_tmp: bool = False
) -> ocp.CheckpointManager:
    """Opens (creating it if needed) a checkpoint directory.

    Args:
      directory: where step directories live, e.g. ``workdir / "checkpoints"``.
      max_to_keep: how many of the latest checkpoints to keep; None keeps all.
      cleanup_tmp: delete unfinished step directories left by a killed run. Only the run that
        owns the directory may do this: another process could be writing one right now.

    Returns:
      An ``orbax.checkpoint.CheckpointManager``; close it (or use it as a context manager)
      when done, so that background saves finish.
    """
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=cleanup_tmp
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    try:
        return ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_handlers=handlers
        )
    except Exception as error:  # orbax raises assorted types for unreadable directories
        raise CheckpointError(f"cannot open checkpoint directory {directory}: {error}") from error


def _step_path(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(manager.directory) / str(step)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """Returns the latest finished checkpoint step, or None when there is none."""
    return manager.latest_step()


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    spec: RunSpec,
    *,
    config: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Saves `state` at step ``state.step``, in the background.

    Args:
      manager: from `open_checkpoints`.
      state: the train state; its width spec is read from its params.
      spec: what is needed to rebuild the state's structure.
      config: the run's JSON-serialisable config, checked on resume.
      history: JSON-serialisable records (e.g. per-epoch validation metrics).
      extra: any other JSON-serialisable data (e.g. keep indices of a pruning method).

    Returns:
      The step directory being written.

    Raises:
      CheckpointError: a checkpoint of this step already exists.
    """
    step = int(state.step)
    path = _step_path(manager, step)
    if step in manager.all_steps():
        raise CheckpointError(f"checkpoint {path} already exists; steps are saved once.")
    host_state = jax.device_get(state)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "model_name": spec.model_name,
        "num_classes": int(spec.num_classes),
        "widths": widths_from_params(host_state.params),
        "input_shape": [int(d) for d in spec.input_shape],
        "optimizer": dataclasses.asdict(spec.optimizer),
        "steps_per_epoch": int(spec.steps_per_epoch),
        "epochs": spec.epochs,
        "rng": [int(x) for x in np.asarray(host_state.rng).ravel()],
        "masks": _masks_spec(host_state.masks),
        "config": dict(config) if config is not None else None,
        "history": list(history),
        "extra": dict(extra) if extra is not None else {},
        "arrays": array_listing(host_state, with_hashes=True),
    }
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    return path


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """Reads the JSON document of a checkpoint (latest by default) without its arrays.

    Raises:
      CheckpointError: there is no such checkpoint, or its document is unreadable.
    """
    step = _resolve_step(manager, step)
    path = _step_path(manager, step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (its meta item failed to load: {error}); delete "
            "it to fall back to an earlier checkpoint."
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has no jaxprune meta document (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}); it was not written "
            "by jaxprune.checkpoint.save_checkpoint."
        )
    return meta


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None:
        if not steps:
            raise CheckpointError(f"no checkpoint in {manager.directory}.")
        return max(steps)
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint of step {step} in {manager.directory}; it has steps {sorted(steps)}."
        )
    return step


def spec_from_meta(meta: Mapping[str, Any]) -> RunSpec:
    """Reads the `RunSpec` stored in a checkpoint's JSON document."""
    optimizer = dict(meta["optimizer"])
    optimizer["decay_epochs"] = tuple(optimizer.get("decay_epochs", ()))
    return RunSpec(
        model_name=meta["model_name"],
        num_classes=meta["num_classes"],
        input_shape=tuple(meta["input_shape"]),
        optimizer=OptimizerConfig(**optimizer),
        steps_per_epoch=meta["steps_per_epoch"],
        epochs=meta["epochs"],
    )


def abstract_train_state(
    model: Any,
    tx: Any,
    input_shape: Sequence[int],
    *,
    masks: PyTree | None = None,
) -> TrainState:
    """The shapes and dtypes of `create_train_state` for a model, without computing anything.

    Args:
      model: the linen module.
      tx: the optimizer.
      input_shape: one example's shape, without the batch axis.
      masks: optional masks (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      A `TrainState` whose array leaves are `jax.ShapeDtypeStruct`.
    """
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(
        lambda x, m: create_train_state(model, tx, jax.random.key(0), x, masks=m), example, masks
    )


def restore_state(
    manager: ocp.CheckpointManager,
    step: int,
    target: PyTree,
    *,
    where: str,
    sharding: jax.sharding.Sharding | None = None,
) -> PyTree:
    """Reads a checkpoint's ``state`` item into the shapes and dtypes of `target`.

    Args:
      manager: the checkpoint manager.
      step: the step to read.
      target: a tree of arrays or `jax.ShapeDtypeStruct` giving every leaf's shape and dtype.
      where: the checkpoint, as error messages name it.
      sharding: where the arrays go (default: the first local device).

    Returns:
      The restored tree.

    Raises:
      CheckpointError: the arrays failed to load (a corrupted or incomplete checkpoint).
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), target
    )
    try:
        return manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
    except Exception as error:  # tensorstore and orbax raise assorted types for bad files
        raise CheckpointError(
            f"checkpoint {where} is corrupted or incomplete; its arrays failed to load "
            f"({type(error).__name__}: {str(error)[:300]}). Delete it to fall back to an "
            "earlier checkpoint."
        ) from error


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    *,
    step: int | None = None,
    target: TrainState | None = None,
    tx: Any = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Restored:
    """Restores a checkpoint (the latest by default), checking it against its target.

    Args:
      manager: from `open_checkpoints`.
      step: which checkpoint; default the latest.
      target: the state (arrays or `jax.ShapeDtypeStruct`) to restore into; its `apply_fn`
        and `tx` are kept. Default: built from the stored spec with `tx` (or the stored
        optimizer config).
      tx: optimizer used to build the default target, for optimizers that `OptimizerConfig`
        cannot describe (e.g. frozen layers); ignored when `target` is given.
      sharding: where the restored arrays go; default the first local device.

    Returns:
      `Restored` (state, model built from the stored spec or None for a model outside the
      zoo restored into `target`, JSON document).

    Raises:
      CheckpointError: no checkpoint; unreadable or corrupted files; arrays that differ in
        name, shape or dtype from the target.
    """
    step = _resolve_step(manager, step)
    path = _step_path(manager, step)
    meta = restore_meta(manager, step)
    model = None
    try:
        spec = spec_from_meta(meta)
        model = build_model(spec.model_name, spec.num_classes, meta["widths"])
    except (KeyError, TypeError, ValueError) as error:
        # A user's own model (not in the zoo) restores into the target it passes.
        if target is None:
            raise CheckpointError(
                f"checkpoint {path} holds a spec that cannot be rebuilt: {error!r}; pass "
                "target= (the abstract TrainState of your model) to restore it."
            ) from error
    if target is None:
        if tx is None:
            tx = make_optimizer(spec.optimizer, spec.steps_per_epoch, spec.epochs)
        target = abstract_train_state(
            model, tx, spec.input_shape, masks=_masks_target(meta.get("masks"))
        )
    stored = meta["arrays"]
    described = f"checkpoint {path} (model {meta.get('model_name')!r}, widths {meta['widths']})"
    check_listing(described, stored, array_listing(target, with_hashes=False))
    restored = restore_state(manager, step, target, where=str(path), sharding=sharding)
    check_hashes(f"checkpoint {path}", stored, restored)
    return Restored(state=restored, model=model, meta=meta)


# ---------------------------------------------------------------------------------------------
# Single-file model artifacts (msgpack)
# ---------------------------------------------------------------------------------------------


def save_model_file(
    path: str | os.PathLike,
    *,
    model_name: str | None,
    num_classes: int | None = None,
    widths: Mapping[str, int] | None = None,
    variables: PyTree,
    meta: Mapping[str, Any],
    input_shape: Sequence[int] | None = None,
) -> Path:
    """Writes a model's variables and description to one msgpack file.

    The file is written to a temporary name and renamed, so a reader never sees half a file.

    Args:
      path: the file to write (e.g. ``models/lenet5_fmnist.msgpack``).
      model_name: zoo model name; None for a model outside the zoo (then read it back with
        `load_variables` and the model's own variables as the target).
      num_classes: outputs of the logits layer.
      widths: the width spec; must equal the one read from ``variables["params"]``.
      variables: ``{"params": ..., "batch_stats": ...}`` as used by ``model.apply``.
      meta: JSON-serialisable description (dataset, accuracy, how it was trained, ...).
      input_shape: one example's shape, without the batch axis, needed to rebuild the model
        on load; default ``meta["input_shape"]``.

    Returns:
      The path written.

    Raises:
      ValueError: `widths` disagree with the params, or the input shape is unknown.
    """
    path = Path(path)
    if input_shape is None:
        input_shape = meta.get("input_shape")
    host_variables = jax.device_get(serialization.to_state_dict(variables))
    header = {
        "format": MODEL_FILE_FORMAT,
        "version": FORMAT_VERSION,
        "model_name": model_name,
        "meta": dict(meta),
        "arrays": array_listing(host_variables, with_hashes=True),
    }
    if model_name is not None:
        if input_shape is None:
            raise ValueError(
                "save_model_file needs the input shape of one example (e.g. (28, 28, 1)); pass "
                "input_shape= or put 'input_shape' in meta."
            )
        actual_widths = widths_from_params(variables["params"])
        if widths is not None and dict(widths) != actual_widths:
            raise ValueError(
                f"widths {dict(widths)} disagree with the params' widths {actual_widths}; pass "
                "widths_from_params(variables['params'])."
            )
        header.update(
            num_classes=int(num_classes),
            widths=actual_widths,
            input_shape=[int(d) for d in input_shape],
        )
    if not is_main_process():
        return path  # one writer in a multi-process run: the first process
    payload = serialization.msgpack_serialize(
        {"header": json.dumps(header), "variables": host_variables}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(payload)
    os.replace(temporary, path)
    return path


def _read_model_file(path: Path) -> tuple[dict[str, Any], Any]:
    """(header, stored variables) of a model file, checked for its format."""
    raw = path.read_bytes()
    try:
        payload = serialization.msgpack_restore(raw)
        header = json.loads(payload["header"])
        stored_variables = payload["variables"]
    except Exception as error:  # msgpack raises assorted types for truncated data
        raise CheckpointError(
            f"model file {path} is truncated or corrupted and cannot be decoded ({error!r})."
        ) from error
    if header.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{path} is not a jaxprune model file (format {header.get('format')!r})."
        )
    return header, stored_variables


def read_model_file_header(path: str | os.PathLike) -> dict[str, Any]:
    """A model file's header (format, model name, input shape, array listing, ``meta``),
    without building its model.

    Raises:
      CheckpointError: the file is not a jaxprune model file, or is damaged.
    """
    header, _ = _read_model_file(Path(path))
    return header


def _restore_into(path: Path, header: Mapping[str, Any], stored_variables: Any, target: Any) -> Any:
    stored = header["arrays"]
    where = f"model file {path}"
    # A model may be stored in another precision (bfloat16, float16): the architecture check
    # compares names and shapes, and the stored dtypes are kept.
    check_listing(where, stored, array_listing(target, with_hashes=False), dtypes=False)
    # The header's listing could itself be stale: check the decoded arrays too.
    check_listing(where, array_listing(stored_variables, with_hashes=False), stored)
    check_hashes(where, stored, stored_variables)
    variables = serialization.from_state_dict(target, stored_variables)
    return jax.tree.map(jnp.asarray, variables)


def load_variables(path: str | os.PathLike, target: PyTree) -> PyTree:
    """The variables of a model file, read into the structure of `target` (a model's own
    variables or their `jax.ShapeDtypeStruct`s) and checked against it: a file of any model,
    zoo or not.

    Raises:
      CheckpointError: a damaged file, or arrays of other names or shapes than `target`.
    """
    path = Path(path)
    header, stored_variables = _read_model_file(path)
    return _restore_into(path, header, stored_variables, target)


def load_model_file(path: str | os.PathLike) -> tuple[Any, dict[str, PyTree], dict[str, Any]]:
    """Reads a zoo model file written by `save_model_file` and checks it against its model.

    Args:
      path: the file.

    Returns:
      ``(model, variables, meta)``: the linen module built from the stored spec, its
      variables (jax arrays) and the ``meta`` given at save time.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is truncated or corrupted, holds a model outside the zoo, or
        its arrays do not match the model its header describes.
    """
    path = Path(path)
    header, stored_variables = _read_model_file(path)
    if header.get("model_name") is None:
        raise CheckpointError(
            f"model file {path} holds a model outside the zoo; read it with "
            "checkpoint.load_variables(path, variables_of_your_model), or on the command line "
            "with --model FILE.py:NAME --variables " + str(path) + "."
        )
    try:
        model = build_model(header["model_name"], header["num_classes"], header["widths"])
        example = jax.ShapeDtypeStruct((1, *header["input_shape"]), jnp.float32)
        target = jax.eval_shape(
            lambda x: model.init(
                {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False
            ),
            example,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"model file {path} holds a spec that cannot be rebuilt: {error!r}"
        ) from error
    return model, _restore_into(path, header, stored_variables, target), header["meta"]


def export_latest(
    workdir: str | os.PathLike, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Writes the latest checkpoint of a training workdir as a single model file.

    Args:
      workdir: a workdir of the old training checkpoints (its ``checkpoints`` folder is read).
      path: the model file to write.
      meta: extra JSON-serialisable description, merged over the one taken from the
        checkpoint (step, config, history, checkpoint path).

    Returns:
      The path written.

    Raises:
      CheckpointError: no checkpoint in the workdir, or a broken one.
      ValueError: the state holds channel masks; prune them into the weights first, since a
        model file holds plain weights only.
    """
    manager = open_checkpoints(Path(workdir) / "checkpoints", max_to_keep=None)
    try:
        restored = restore_checkpoint(manager)
    finally:
        manager.close()
    if restored.state.masks is not None:
        raise ValueError(
            f"the latest checkpoint of {workdir} holds channel masks; apply them with "
            "jaxprune.surgery (physical pruning) before exporting plain weights."
        )
    stored = restored.meta
    described = {
        "step": stored["step"],
        "config": stored["config"],
        "history": stored["history"],
        "checkpoint": str(_step_path(manager, stored["step"])),
        **(meta or {}),
    }
    variables = {"params": restored.state.params, **restored.state.collections}
    return save_model_file(
        path,
        model_name=stored["model_name"],
        num_classes=stored["num_classes"],
        widths=stored["widths"],
        variables=variables,
        meta=described,
        input_shape=stored["input_shape"],
    )
