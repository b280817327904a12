"""`jaxprune prune --method progressive`: Osaku et al.'s layer-by-layer simplification.

    jaxprune prune --method progressive --criterion oracle_loss --progressive-ratio 0.25 \\
        --retrain-examples 2048 --workdir workdirs/progressive
    jaxprune prune --method progressive --criterion subjective --selection chosen.json ...
    jaxprune prune --method progressive --criterion subjective --wait-for-selection ...

The job's ``progressive`` field holds a `ProgressiveConfig`; `FLAGS` lists the command-line flags
that set it and `run` runs it on a zoo model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxprune import checkpoint
from jaxprune.commands import reporting
from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune

# flag name -> (type, help, PruneJob field paths it sets). "seed" and "batch_size" exist in
# `jaxprune prune` already: their paths are the ones to add.
FLAGS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "progressive_ratio": (
        float,
        "progressive: fraction p of each layer's kernels removed (default 0.05)",
        ("progressive.ratio",),
    ),
    "kernels_per_layer": (
        int,
        "progressive: remove this many kernels of each layer instead of a fraction",
        ("progressive.count",),
    ),
    "retraining": (
        str,
        "progressive: 'progressive' (layers 1..l+1), 'complete' or 'none'",
        ("progressive.retraining",),
    ),
    "retrain_loss": (
        str,
        "progressive: 'mse' (layer l+1 output, default) or 'cross_entropy'",
        ("progressive.loss",),
    ),
    "retrain_examples": (
        int,
        "progressive: training images per layer's retraining (default: all)",
        ("progressive.retrain_examples",),
    ),
    "score_examples": (
        int,
        "training images the criterion reads",
        ("progressive.score_examples",),
    ),
    "final_finetune_epochs": (
        int,
        "progressive: epochs of whole-network fine-tuning at the end",
        ("progressive.final_finetune_epochs",),
    ),
    "reinit_head": (
        bool,
        "progressive: re-initialise the dense head before the final fine-tuning",
        ("progressive.reinit_head",),
    ),
    "selection": (
        str,
        "progressive, subjective criterion: the kernel selection file (or folder) to replay",
        ("progressive.selection",),
    ),
    "wait_for_selection": (
        bool,
        "progressive, subjective criterion: write each layer's page and wait for its choice",
        ("progressive.wait_for_selection",),
    ),
    "seed": (int, "seed", ("progressive.seed",)),
    "batch_size": (int, "retraining batch size", ("progressive.batch_size",)),
}


def run(
    config: ProgressiveConfig,
    name: str,
    model: Any,
    variables: Any,
    dataset: Any,
    workdir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs progressive simplification on a zoo model; resumes from `workdir` when run again.

    Args:
      config: the method's settings.
      name: the zoo name of `model` (e.g. "vgg_small").
      model: the linen module loaded from the model file.
      variables: its variables.
      dataset: a `jaxprune.data.Dataset`.
      workdir: checkpoints, the selection pages, and ``pruned.msgpack`` go here.
      progress: show a progress bar over the layers.

    Returns:
      ``{"widths", "keep", "summary", "history"}``: summary = `reporting.cost_summary` (base
      and final cost) updated with `reporting.measure` (validation and test metrics) and the
      method's own entries (criterion, retraining, final fine-tuning, timings).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, progress=progress)
    result = progressive_prune(config, name, variables, dataset, workdir=workdir)
    reporting.save_pruned(
        workdir / "pruned.msgpack",
        model_name=name,
        dataset=dataset,
        widths=result.widths,
        variables=result.variables,
        method="progressive",
        criterion=config.criterion,
        keep=result.keep,
        retraining=config.retraining,
    )
    pruned_model, pruned_variables, _ = checkpoint.load_model_file(workdir / "pruned.msgpack")
    kept = sum(len(v) for v in result.keep.values())
    total = sum(h["kernels_before"] for h in result.history) or 1
    summary, _ = reporting.pruned_summary(
        (model.apply, variables),
        (pruned_model.apply, pruned_variables),
        dataset,
        batch_size=config.score_batch_size,
        channels_remaining=kept / total if result.history else 1.0,
    )
    summary.update(
        {
            "criterion": config.criterion,
            "retraining": config.retraining,
            "layers": result.summary["layers"],
            "finetune": result.summary["finetune"],
            "time": result.summary["time"],
        }
    )
    return {
        "widths": result.widths,
        "keep": reporting.keep_lists(result.keep),
        "summary": reporting.plain_json(summary),
        "history": result.history,
    }
