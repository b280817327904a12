"""One-shot pruning: rank channels once by a criterion and keep the best of each group.

The baselines of the four papers (L1 of Li et al. 2017, APoZ of Hu et al. 2016, FPGM, Network
Slimming, HRank, entropy, Taylor-FO, random) are one-shot: score every channel on validation
batches, remove the lowest fraction, optionally fine-tune. Scoring lives in `jaxprune.criteria`,
the choice in `methods.selection`, removal in `jaxprune.surgery`.

Example:
  >>> model = jp.Model.linen(module, x, variables=variables)
  >>> result = oneshot_prune(model, variables, batches, OneShotConfig(criterion="l1", ratio=0.5))
  >>> logits = result.model(result.variables, x)  # the pruned program
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

from jaxprune import cost, criteria, train
from jaxprune.fit import FitConfig, fit
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.methods.contract import PruneData, PruneResult, as_prune_data
from jaxprune.methods.live import checkpointed_steps, open_metrics, write_result
from jaxprune.methods.selection import check_selection, keep_from_scores, select_groups
from jaxprune.model import Model
from jaxprune.run import RunDir, config_identity, fingerprint
from jaxprune.surgery import prune

__all__ = ["OneShotConfig", "keep_from_scores", "oneshot_prune", "select_groups"]

# Fields that do not change a one-shot run's result.
_COSMETIC = ("finetune.checkpoint_every",)


@dataclasses.dataclass(frozen=True)
class OneShotConfig:
    """A one-shot run: which criterion, how many channels go, and the fine-tuning after."""

    # Relevance criterion by registry name (see `jaxprune.criteria.CRITERIA`).
    criterion: str = "l1"
    # Fraction of each selected group's channels removed (per layer) or of all (global).
    ratio: float = 0.5
    # "conv": only groups produced by convolutions; "all": dense hidden layers too.
    scope: str = "conv"
    # "per_layer" or "global" (a global ranking compares L2-normalised scores, Molchanov et
    # al. 2017's per-layer normalisation).
    ranking: str = "per_layer"
    # Never leave a group with fewer channels than this.
    min_channels: int = 1
    # Validation batches the criterion reads (None: all); weight criteria read none.
    score_batches: int | None = 8
    # Fine-tuning of the pruned model on the training data; None: none.
    finetune: FitConfig | None = None
    # Seed of the random criterion.
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the first invalid field, before any work."""
        check_selection(self)
        if self.criterion not in criteria.CRITERIA:
            raise ValueError(
                f"criterion {self.criterion!r} is not a registered criterion; choose one of "
                f"{sorted(criteria.CRITERIA)}."
            )
        if self.score_batches is not None and self.score_batches < 1:
            raise ValueError(f"score_batches must be >= 1 or None, got {self.score_batches}.")
        if self.finetune is not None:
            self.finetune.check()


def oneshot_prune(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: OneShotConfig = OneShotConfig(),
    *,
    workdir: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """Scores every channel once, keeps the best of each group, removes the rest, and
    optionally fine-tunes.

    Args:
      model: the model (`jaxprune.Model`).
      variables: its trained variables.
      data: validation batches for the criterion (and training epochs for fine-tuning); see
        `methods.contract.as_prune_data`. Never the test split.
      config: criterion, ratio, scope, ranking, fine-tuning.
      workdir: where the run keeps its scores, checkpoints and ``result.json``; rerunning it
        resumes, and another run there is refused.
      progress: progress bars.

    Returns:
      A `PruneResult`; its model runs the pruned program.
    """
    config.check()
    data = as_prune_data(data)
    graph = channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    score_batches = _score_batches(data, config)
    identity = {
        "config": config_identity(config, _COSMETIC),
        "variables": fingerprint(variables),
        "data": fingerprint(score_batches) if score_batches else None,
    }
    with RunDir.maybe(workdir, kind="oneshot", identity=identity) as run:
        scores = _scores(model, graph, variables, score_batches, config, run)
        keep = keep_from_scores(graph, scores, config)
        pruned = prune(variables, graph, keep)
        small = model.with_apply_fn(pruned.apply_fn)
        result_variables, history = pruned.variables, []
        metrics = open_metrics(run, checkpointed_steps(run, "fit"))
        if config.finetune is not None:
            result_variables, history = fit(
                small,
                pruned.variables,
                data,
                config.finetune,
                run=run,
                progress=progress,
                metrics=metrics,
            )
        summary = summarize(model, variables, small, result_variables, data)
        summary["method"] = {"criterion": config.criterion, "groups": len(keep)}
        write_result(metrics, (history[-1]["step"] if history else 0) + 1, summary)
        if run is not None:
            run.write_json("result.json", summary)
    return PruneResult("oneshot", small, result_variables, keep, graph, tuple(history), summary)


def _score_batches(data: PruneData, config: OneShotConfig) -> list:
    if not criteria.get_criterion(config.criterion, **_options(config)).uses_batches:
        return []
    batches = data.validation()
    if config.score_batches is not None:
        batches = itertools.islice(batches, config.score_batches)
    return list(batches)


def _options(config: OneShotConfig) -> dict[str, Any]:
    return {"seed": config.seed} if config.criterion == "random" else {}


def _scores(
    model: Model,
    graph: ChannelGraph,
    variables: Any,
    batches: list,
    config: OneShotConfig,
    run: RunDir | None,
) -> dict[str, Any]:
    """The criterion's scores (reused from the run directory when they are this run's)."""
    import numpy as np

    if run is not None:
        stored = run.artifact("scores.json", run.identity)
        if stored is not None:
            return {name: np.asarray(values) for name, values in stored.items()}
    context = criteria.ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
    scores = criteria.score(config.criterion, context, variables, batches, **_options(config))
    if config.ranking == "global":
        scores = criteria.normalize_l2(scores)
    if run is not None:
        run.save_artifact("scores.json", run.identity, scores)
    return scores


def summarize(
    model: Model,
    variables: Any,
    pruned_model: Model,
    pruned_variables: Any,
    data: PruneData,
) -> dict[str, Any]:
    """Cost and validation metrics of a model before and after pruning."""
    before = cost.count(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    after = cost.count(
        pruned_model.apply_fn, pruned_variables, model.example_input, **model.eval_kwargs
    )
    summary: dict[str, Any] = {
        "cost": {
            "before": {"macs": before.macs, "flops": before.flops, "params": before.params},
            "after": {"macs": after.macs, "flops": after.flops, "params": after.params},
        }
    }
    try:
        summary["validation"] = {
            "before": train.evaluate(model, variables, data.validation()),
            "after": train.evaluate(pruned_model, pruned_variables, data.validation()),
        }
    except (KeyError, ValueError):  # no labels, or not a classifier: cost only
        pass
    return summary
