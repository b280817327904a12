"""`jaxprune prune --method functional`: functionality-oriented pruning of a zoo model.

    jaxprune prune --method functional --ratio 0.5 --workdir workdirs/functional
    jaxprune prune --method functional --set functional.clustering.threshold=0.4 \\
        --workdir workdirs/functional_threshold

The run: activation-maximisation images of every conv filter (checkpointed per layer in
``workdir/functionality``, so a killed run resumes after the last finished layer), clusters and
representatives, ``workdir/pruned_before_finetune.msgpack``, then (with ``finetune_epochs``)
a resumable fine-tuning in ``workdir/finetune``; ``workdir/pruned.msgpack`` is the final model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint, data
from jaxprune.commands import reporting
from jaxprune.graph import channel_graph
from jaxprune.methods.functional import FunctionalConfig, check_config, functional_prune
from jaxprune.methods.oneshot import select_groups
from jaxprune.models import widths_from_params

# Extra flags of `jaxprune prune`: flag -> (type, help, PruneJob field paths it sets). The
# shared flags ratio, seed, score_examples, finetune_epochs and batch_size reuse the paths here.
FLAGS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "ratio": (float, "functional: fraction of every conv's filters removed", ("functional.ratio",)),
    "seed": (int, "functional: seed of k-means and fine-tuning", ("functional.seed",)),
    "score_examples": (int, "validation images scored", ("functional.score_examples",)),
    "finetune_epochs": (int, "fine-tuning epochs", ("functional.finetune_epochs",)),
    "batch_size": (int, "scoring and evaluation batch size", ("functional.batch_size",)),
    "similarity_threshold": (
        float,
        "functional: merge filters whose images' mean cosine similarity is >= this (no --ratio)",
        ("functional.clustering.threshold",),
    ),
    "clustering": (
        str,
        "functional: 'agglomerative' (average linkage) or 'kmeans' (needs --ratio)",
        ("functional.clustering.method",),
    ),
    "representative": (
        str,
        "functional: keep per cluster the best by --criterion ('criterion') or 'centroid'",
        ("functional.representative",),
    ),
    "visualization_steps": (
        int,
        "functional: gradient-ascent steps per activation-maximisation image",
        ("functional.visualization.steps",),
    ),
}


def pruning_settings(config: FunctionalConfig) -> dict[str, Any]:
    """The fields of `config` that decide the pruned model (not fine-tuning, not progress)."""
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    for name in ("finetune_epochs", "finetune_lr", "progress"):
        settings.pop(name)
    return settings


def run(
    config: FunctionalConfig,
    name: str,
    model: Any,
    variables: Any,
    dataset: Any,
    workdir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs functionality-oriented pruning on a zoo model; resumes from `workdir`.

    Args:
      config: the method's settings.
      name: the zoo name of the model (e.g. "vgg_small").
      model: the linen module loaded from the model file.
      variables: its variables.
      dataset: a `jaxprune.data.Dataset` (validation images for the criterion, the test split
        for the report, the training split for fine-tuning).
      workdir: the run's folder.
      progress: show progress bars.

    Returns:
      ``{"widths", "keep", "summary", "history"}``; summary holds the cost before and after,
      validation and test metrics, per-layer cluster counts and thresholds, and (with
      fine-tuning) the metrics before it.
    """
    check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    graph = channel_graph(model.apply, variables, x)
    before_file = workdir / "pruned_before_finetune.msgpack"
    if not before_file.is_file():
        batches = list(
            data.preprocessed_batches(
                dataset, "validation", config.batch_size, config.score_examples
            )
        )
        result = functional_prune(
            model.apply,
            graph,
            variables,
            batches,
            dataclasses.replace(config, progress=progress),
            input_shape=tuple(dataset.image_shape),
            workdir=workdir / "functionality",
        )
        layers = {
            group: {
                "filters": int(len(layer.labels)),
                "clusters": int(len(np.unique(layer.labels))),
                # None where no threshold applies (k-means, or nothing merged).
                "threshold": layer.threshold if np.isfinite(layer.threshold) else None,
            }
            for group, layer in result.layers.items()
        }
        reporting.save_pruned(
            before_file,
            model_name=name,
            dataset=dataset,
            widths=result.pruned.widths,
            variables=result.pruned.variables,
            method="functional",
            criterion=config.criterion,
            keep=result.pruned.keep,
            layers=json.loads(json.dumps(layers)),
            config=pruning_settings(config),
        )
    small, small_variables, meta = checkpoint.load_model_file(before_file)
    if meta.get("config") != pruning_settings(config):
        raise ValueError(
            f"{before_file} was pruned with other settings ({meta.get('config')}); use a fresh "
            "workdir, or delete that file to prune again."
        )
    fine_tune = reporting.fine_tuner(
        name,
        before_file,
        dataset.config,
        workdir / "finetune",
        epochs=config.finetune_epochs,
        learning_rate=config.finetune_lr,
        seed=config.seed,
    )
    summary, final_variables = reporting.pruned_summary(
        (model.apply, variables),
        (small.apply, small_variables),
        dataset,
        batch_size=config.batch_size,
        channels_remaining=reporting.channels_remaining(
            graph, select_groups(graph, config.scope), meta["keep"]
        ),
        fine_tune=fine_tune,
    )
    summary["layers"] = meta["layers"]
    reporting.save_pruned(
        workdir / "pruned.msgpack",
        model_name=name,
        dataset=dataset,
        widths=widths_from_params(final_variables["params"]),
        variables=final_variables,
        method="functional",
        criterion=config.criterion,
        keep=meta["keep"],
        layers=meta["layers"],
        finetune_epochs=config.finetune_epochs,
    )
    history = [{"group": g, **v} for g, v in meta["layers"].items()]
    return {
        "widths": widths_from_params(final_variables["params"]),
        "keep": meta["keep"],
        "summary": summary,
        "history": history,
    }
