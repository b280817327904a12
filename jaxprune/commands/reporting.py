"""What every pruning job reports: cost before and after, metrics per split, the pruned model file.

The methods of `jaxprune prune` (and the demo) share these so that their ``result.json`` files
have one shape: ``summary = {"base": cost, "final": cost + remaining fractions, "validation":
metrics, "test": metrics, ...}``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint, cost, train, train_job
from jaxprune.methods.iterative import evaluate_split
from jaxprune.model import Model

json_default = checkpoint.json_default


def measure(
    apply_fn: Any,
    variables: Mapping[str, Any],
    dataset: Any,
    *,
    batch_size: int = 128,
    splits: Iterable[str] = ("validation", "test"),
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Loss, accuracy and Cohen's kappa of a model on whole splits (or their first `limit` images).

    Args:
      apply_fn: the model's apply function.
      variables: its variables.
      dataset: a `jaxprune.data.Dataset`.
      batch_size: evaluation batch size (the last batch is padded, so every image counts once).
      splits: the splits to evaluate.
      limit: evaluate only this many images of each split (None: all).

    Returns:
      ``{split: {"loss", "accuracy", "kappa", ...}}``.
    """
    example = jax.ShapeDtypeStruct((1, *dataset.image_shape), jnp.float32)
    model = Model.from_apply(apply_fn, example, train_flag="train")
    mesh = train.make_mesh()
    return {
        split: evaluate_split(
            model, variables, dataset, split, batch_size=batch_size, limit=limit, mesh=mesh
        )
        for split in splits
    }


def keep_lists(keep: Mapping[str, Any]) -> dict[str, list[int]]:
    """Kept channel indices per group as plain lists of ints, for JSON.

    Args:
      keep: per group, kept indices (arrays or sequences).

    Returns:
      ``{group: [index, ...]}``.
    """
    return {group: np.asarray(indices).tolist() for group, indices in keep.items()}


def plain_json(value: Any) -> Any:
    """`value` made of plain JSON types only (NumPy scalars and arrays through `json_default`)."""
    return json.loads(json.dumps(value, default=json_default))


def channels_remaining(graph: Any, groups: Iterable[str], keep: Mapping[str, Any]) -> float:
    """The fraction of the channels of `groups` that `keep` keeps.

    Args:
      graph: the base model's `jaxprune.graph.ChannelGraph`.
      groups: the prunable groups (e.g. `methods.oneshot.select_groups` of a scope).
      keep: kept base-model indices per group; a group it does not name keeps all its channels.

    Returns:
      Kept channels over all channels of `groups`.
    """
    groups = list(groups)
    kept = sum(len(keep.get(group, range(graph[group].size))) for group in groups)
    return kept / sum(graph[group].size for group in groups)


def fine_tuner(
    model_name: str,
    model_file: str | Path,
    data_config: Any,
    workdir: str | Path,
    *,
    epochs: int,
    learning_rate: float,
    seed: int,
) -> Callable[[], Mapping[str, Any]] | None:
    """The `fine_tune` argument of `pruned_summary`: `train_job.fine_tune` of a pruned model file.

    Args:
      model_name: zoo name of the model in `model_file`.
      model_file: the pruned model file.
      data_config: the training data (`jaxprune.data.DataConfig`).
      workdir: the fine-tuning's checkpoints (it resumes from them).
      epochs: passes over the training split; 0 or fewer: no fine-tuning.
      learning_rate: the peak learning rate.
      seed: data order and dropout seed.

    Returns:
      A function of no arguments returning the fine-tuned variables, or None when `epochs` is 0.
    """
    if epochs <= 0:
        return None
    return functools.partial(
        train_job.fine_tune,
        model_name,
        model_file,
        data_config,
        workdir,
        epochs=epochs,
        learning_rate=learning_rate,
        seed=seed,
    )


def pruned_summary(
    base: tuple[Any, Mapping[str, Any]],
    pruned: tuple[Any, Mapping[str, Any]],
    dataset: Any,
    *,
    batch_size: int,
    channels_remaining: float | None = None,
    fine_tune: Callable[[], Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The summary every pruning runner reports, fine-tuning the pruned model on the way if asked.

    Args:
      base: ``(apply_fn, variables)`` of the model before pruning.
      pruned: ``(apply_fn, variables)`` after pruning.
      dataset: the `jaxprune.data.Dataset` (image shape; validation and test splits).
      batch_size: evaluation batch size.
      channels_remaining: the fraction of prunable channels kept, when the caller knows it.
      fine_tune: None, or a function that fine-tunes the pruned model and returns its new
        variables (same shapes, same `apply_fn`).

    Returns:
      ``(summary, final_variables)``: summary = `cost_summary` and the validation and test
      metrics (`measure`) of the final model; with `fine_tune`, the metrics before it too
      (``before_finetune``), and final_variables are the fine-tuned ones.
    """
    summary = cost_summary(base, pruned, dataset.image_shape, channels_remaining=channels_remaining)
    apply_fn, variables = pruned
    before = measure(apply_fn, variables, dataset, batch_size=batch_size)
    summary.update(before)
    if fine_tune is not None:
        variables = fine_tune()
        summary["before_finetune"] = before
        summary.update(measure(apply_fn, variables, dataset, batch_size=batch_size))
    return summary, variables


def cost_summary(
    base: tuple[Any, Mapping[str, Any]],
    pruned: tuple[Any, Mapping[str, Any]],
    input_shape: tuple[int, ...],
    *,
    channels_remaining: float | None = None,
) -> dict[str, dict[str, Any]]:
    """FLOPs, MACs and parameters of a base and a pruned model, and the fractions that remain.

    Args:
      base: ``(apply_fn, variables)`` of the model before pruning.
      pruned: ``(apply_fn, variables)`` after pruning.
      input_shape: one example's shape (no batch axis).
      channels_remaining: the fraction of prunable channels kept, when the caller knows it.

    Returns:
      ``{"base": {"flops", "macs", "params"}, "final": {..., "remaining": {...}}}``.
    """
    x = jnp.zeros((1, *input_shape), jnp.float32)
    before = cost.count(base[0], base[1], x)
    after = cost.count(pruned[0], pruned[1], x)
    remaining: dict[str, float] = {
        "flops": after.flops / before.flops,
        "macs": after.macs / before.macs,
        "params": after.params / before.params,
    }
    if channels_remaining is not None:
        remaining["channels"] = float(channels_remaining)
    return {
        "base": {"flops": before.flops, "macs": before.macs, "params": before.params},
        "final": {
            "flops": after.flops,
            "macs": after.macs,
            "params": after.params,
            "remaining": remaining,
        },
    }


def save_pruned(
    path: str | Path,
    *,
    model_name: str,
    dataset: Any,
    widths: Mapping[str, int],
    variables: Mapping[str, Any],
    method: str,
    criterion: str,
    keep: Mapping[str, Any],
    **meta: Any,
) -> Path:
    """Writes a pruned zoo model as a model file (`checkpoint.load_model_file` reads it back).

    Args:
      path: the file to write.
      model_name: zoo name of the model.
      dataset: the `jaxprune.data.Dataset` it was pruned on (classes and image shape).
      widths: the pruned width spec.
      variables: the pruned variables.
      method: the pruning method's name, recorded in the file's metadata.
      criterion: the criterion's name, recorded too.
      keep: kept channel indices per group, recorded too.
      **meta: further JSON-serialisable metadata.

    Returns:
      The path written.
    """
    return checkpoint.save_model_file(
        path,
        model_name=model_name,
        num_classes=dataset.num_classes,
        widths=dict(widths),
        variables=variables,
        input_shape=dataset.image_shape,
        meta={
            "method": method,
            "criterion": criterion,
            "keep": keep_lists(keep),
            **meta,
        },
    )
