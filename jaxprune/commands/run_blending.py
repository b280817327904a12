"""`jaxprune prune --method blending`: criteria blending with an evolutionary search on a zoo model.

    jaxprune prune --method blending --ratio 0.5 --population 32 --generations 20 \\
        --workdir workdirs/blending

Scores the pool on validation images, clusters the criteria per layer, searches the calibration
factors (checkpointed every generation in ``workdir/search``; rerunning resumes), prunes with
the best blend, fine-tunes (``workdir/finetune``), and reports cost and accuracy before and
after fine-tuning.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxprune import checkpoint, data
from jaxprune.commands import reporting
from jaxprune.graph import channel_graph
from jaxprune.methods.blending import BlendingConfig, blending_prune
from jaxprune.methods.oneshot import select_groups
from jaxprune.models import widths_from_params

# flag -> (type, help, PruneJob paths it sets); ratio, ranking, scope, seed, score_examples and
# finetune_epochs exist already and only gain the blending paths.
FLAGS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "ratio": (float, "fraction of kernels removed", ("blending.ratio",)),
    "ranking": (str, "'per_layer' or 'global'", ("blending.ranking",)),
    "scope": (str, "'conv' or 'all'", ("blending.scope",)),
    "seed": (int, "seed", ("blending.seed",)),
    "score_examples": (int, "validation images scored", ("blending.score_examples",)),
    "finetune_epochs": (int, "fine-tuning epochs", ("blending.finetune_epochs",)),
    "learning_rate": (float, "fine-tuning learning rate", ("blending.finetune_lr",)),
    "population": (
        int,
        "blending: candidate factor sets per generation",
        ("blending.evolution.population",),
    ),
    "generations": (
        int,
        "blending: generations of the search",
        ("blending.evolution.generations",),
    ),
    "fitness_examples": (
        int,
        "blending: validation images of the fitness",
        ("blending.fitness_examples",),
    ),
    "fitness": (str, "blending: 'accuracy' or 'loss'", ("blending.fitness",)),
    "similarity": (
        str,
        "blending: 'spearman' or 'kendall' rank similarity",
        ("blending.clustering.similarity",),
    ),
    "cluster_threshold": (
        float,
        "blending: merge criteria whose similarity is at least this",
        ("blending.clustering.threshold",),
    ),
    "num_clusters": (
        int,
        "blending: clusters per layer (0: use the threshold)",
        ("blending.clustering.num_clusters",),
    ),
    "chunk_size": (
        int,
        "blending: candidates per vmapped fitness call (0: automatic, 1 on a CPU, up to 32 on "
        "accelerators)",
        ("blending.chunk_size",),
    ),
}


def _validation_batches(dataset: Any, batch_size: int, wanted: int) -> list[dict[str, Any]]:
    """The first `wanted` validation images (all of them when the split is smaller)."""
    examples = min(wanted, dataset.num_examples["validation"])
    return list(data.preprocessed_batches(dataset, "validation", batch_size, examples))


def run(
    config: BlendingConfig,
    name: str,
    model: Any,
    variables: Any,
    dataset: Any,
    workdir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs criteria blending on a zoo model, resuming from `workdir`.

    Args:
      config: the blending settings.
      name: zoo name of the model (e.g. "vgg_small").
      model: the linen module loaded from the model file.
      variables: its variables.
      dataset: a `jaxprune.data.Dataset`; criteria and fitness read its validation split (at
        most `score_examples` / `fitness_examples` images), the report its test split.
      workdir: checkpoints, ``pool_scores.npz``, ``pruned.msgpack`` and the fine-tuning.
      progress: progress bars over generations and fine-tuning.

    Returns:
      ``{"widths", "keep", "summary", "history"}``; summary holds the cost before and after,
      validation and test metrics (after fine-tuning when there is one, with
      ``before_finetune``), and ``blending``: factors, clusters, best fitness and timings.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    graph = channel_graph(model.apply, variables, x)
    began = time.perf_counter()
    score_batches = _validation_batches(dataset, config.batch_size, config.score_examples)
    fitness_batches = _validation_batches(dataset, config.batch_size, config.fitness_examples)
    result = blending_prune(
        model.apply,
        graph,
        variables,
        score_batches,
        fitness_batches,
        config=config,
        workdir=workdir,
        progress=progress,
    )
    search_s = time.perf_counter() - began
    pruned_file = workdir / "pruned.msgpack"
    if not pruned_file.is_file():
        reporting.save_pruned(
            pruned_file,
            model_name=name,
            dataset=dataset,
            widths=result.pruned.widths,
            variables=result.pruned.variables,
            method="blending",
            criterion=config.criterion,
            keep=result.pruned.keep,
            factors=result.factors,
        )
    small, small_variables, meta = checkpoint.load_model_file(pruned_file)
    data_config = dataset.config
    if config.finetune_examples:
        data_config = dataclasses.replace(data_config, train_examples=config.finetune_examples)
    fine_tune = reporting.fine_tuner(
        name,
        pruned_file,
        data_config,
        workdir / "finetune",
        epochs=config.finetune_epochs,
        learning_rate=config.finetune_lr,
        seed=config.seed,
    )
    summary, _ = reporting.pruned_summary(
        (model.apply, variables),
        (small.apply, small_variables),
        dataset,
        batch_size=config.batch_size,
        channels_remaining=reporting.channels_remaining(
            graph, select_groups(graph, config.scope), meta["keep"]
        ),
        fine_tune=fine_tune,
    )
    summary["blending"] = {
        "factors": result.factors,
        "clusters": {g: c.to_dict() for g, c in result.clusters.items()},
        "best": result.best,
        "generations": len(result.history),
        "search_s_of_this_call": search_s,
    }
    return {
        "widths": widths_from_params(small_variables["params"]),
        "keep": meta["keep"],
        "summary": reporting.plain_json(summary),
        "history": result.history,
    }
