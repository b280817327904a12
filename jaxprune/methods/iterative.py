"""Greedy iterative pruning interleaved with fine-tuning (Molchanov et al., ICLR 2017).

"Pruning Convolutional Neural Networks for Resource Efficient Inference" (arXiv 1611.06440)
starts from a trained network and repeats:

1. run `u` fine-tuning updates (SGD with momentum) while accumulating a relevance criterion for
   every surviving channel, on the same mini-batches;
2. normalise the scores per layer (L2) and optionally subtract a FLOPs regulariser;
3. remove the `k` lowest-ranked channels over all layers (a global ranking; the paper uses
   k = 1), never emptying a layer;

until a target is met: a fraction of the FLOPs, MACs, parameters or channels left, or an
accuracy floor on the validation split. An optional fine-tuning follows.

Removed channels are *masked* while iterating: the gates of `jaxprune.gates` are traced inputs,
so the train step, the criterion and the evaluation are compiled once and reused while the masks
change. Every `shrink_every` pruning steps, and at the end, the masked channels are removed
physically (`surgery.prune`, with the optimizer momentum sliced alongside): the model becomes
the original's pruned program at the cumulative keep, so any model works, with no rebuild
(`methods.iterative_network`). Every pruning step can be checkpointed in a workdir; a killed run
resumes from its last checkpoint and ends exactly where an uninterrupted one ends.

Example:
  >>> import jaxprune as jp
  >>> model = jp.Model.linen(module, x, variables=variables)
  >>> config = IterativeConfig(criterion="taylor", channels_per_step=8, target_flops=0.5)
  >>> result = iterative_prune(model, variables, data, config, workdir="runs/taylor")
  >>> logits = result.model(result.variables, x)  # the pruned program
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxprune import cost, criteria, train
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.methods.contract import PruneData, PruneResult, as_prune_data
from jaxprune.methods.iterative_checkpoint import SEQUENCE, Progress, restore, save
from jaxprune.methods.iterative_loop import (
    CompileClock,
    TrainStream,
    finetune_and_score,
    validation_batches,
)
from jaxprune.methods.iterative_network import (
    Network,
    flops_per_channel,
    make_network,
    masked_cost,
    plain_variables,
    shrink,
    structs,
)
from jaxprune.methods.iterative_ranking import (
    NORMALIZATIONS,
    choose_removals,
    rank_scores,
    remove_channels,
)
from jaxprune.methods.live import open_metrics, write_result
from jaxprune.methods.selection import SCOPES, select_groups
from jaxprune.model import Model
from jaxprune.run import RunDir, config_identity, fingerprint
from jaxprune.runtime import release_compiled_programs_if_crowded

__all__ = [
    "MEASURES",
    "STOP_REASONS",
    "IterativeConfig",
    "choose_removals",
    "iterative_prune",
    "rank_scores",
    "remove_channels",
]

PyTree = Any

# Measures a target can be set on; each is the fraction of the base model's that remains.
MEASURES = ("flops", "macs", "params", "channels")
STOP_REASONS = ("target", "accuracy_floor", "max_steps", "nothing_left")
# Config fields that do not change a run's result: a resumed run may change them.
_COSMETIC = ("checkpoint_every",)


def _default_optimizer() -> train.OptimizerConfig:
    return train.OptimizerConfig(
        name="sgd", learning_rate=1e-3, momentum=0.9, weight_decay=1e-4, schedule="constant"
    )


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """One iterative pruning run (JSON-serialisable with `to_dict`)."""

    # Relevance criterion by registry name (see `jaxprune.criteria.CRITERIA`); "taylor" is the
    # paper's. Also "min_weight", "activation_mean", "apoz", "random", "oracle_abs", ...
    criterion: str = "taylor"
    # Keyword options of the criterion, e.g. {"variant": "abs_then_mean"}. A criterion with a
    # `seed` option gets (its seed or `seed`) + pruning step, so "random" draws anew each step.
    criterion_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Fine-tuning updates between two pruning steps (u): 30 for Birds-200, 10 for Flowers-102
    # in the paper.
    updates_per_step: int = 10
    # The criterion reads the batches of the last this-many of those updates; None: all of them
    # (the paper). Fewer makes an expensive criterion such as "oracle_abs" affordable.
    score_updates: int | None = None
    # Channels removed per pruning step (k); the paper removes 1.
    channels_per_step: int = 1
    # Per-layer normalisation of the scores before the global ranking: "l2" (the paper's) or
    # "none".
    normalization: str = "l2"
    # FLOPs regularisation strength lambda: score - lambda * (MFLOPs of the channel); 0: off.
    flops_regularization: float = 0.0
    # Which channel groups may be pruned: "conv" (kernels of convolutions) or "all" (dense
    # hidden layers too).
    scope: str = "conv"
    # No group is left with fewer channels than this (>= 1: a group is never emptied).
    min_channels: int = 1
    # Stop once the remaining fraction of the base model's FLOPs / MACs / parameters / pruned
    # channels (those in `scope`) is at or below this; None: no such target. Any target met
    # stops the run.
    target_flops: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_channels: float | None = None
    # Stop when the validation accuracy after a pruning step falls below this; that step is
    # undone (its channels come back). None: no floor.
    min_accuracy: float | None = None
    # Stop after this many pruning steps; None: no limit.
    max_steps: int | None = None
    # Shrink the model physically every this many pruning steps (and always at the end); 0:
    # only at the end. Each shrink costs a recompilation.
    shrink_every: int = 10
    # Fine-tuning updates after the last pruning step.
    final_updates: int = 0
    # Mini-batch size when `data` is a `jaxprune.data.Dataset` (training, criterion and
    # validation); other data comes in its own batches.
    batch_size: int = 32
    # SGD with momentum 0.9 in the paper; the schedule must be "constant".
    optimizer: train.OptimizerConfig = dataclasses.field(default_factory=_default_optimizer)
    # Evaluate on the validation data after every this-many pruning steps (after every step
    # when `min_accuracy` is set).
    eval_every: int = 1
    # Validation examples of each evaluation (the first ones of the data); None: all.
    eval_examples: int | None = None
    # Save a checkpoint every this many pruning steps (always at the end) when a workdir is set.
    checkpoint_every: int = 1
    # Seed of the data order (for a `Dataset`), dropout and random criteria.
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the first invalid field and the fix, before any work."""
        positive = ("updates_per_step", "channels_per_step", "min_channels", "batch_size")
        for name in (*positive, "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"IterativeConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("shrink_every", "final_updates", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"IterativeConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.criterion not in criteria.CRITERIA:
            raise ValueError(
                f"IterativeConfig.criterion={self.criterion!r} is not a registered criterion; "
                f"choose one of {', '.join(sorted(criteria.CRITERIA))}."
            )
        if self.score_updates is not None and not 1 <= self.score_updates <= (
            self.updates_per_step
        ):
            raise ValueError(
                f"IterativeConfig.score_updates={self.score_updates} must lie in 1.."
                f"{self.updates_per_step} (updates_per_step), or be None for all updates."
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"IterativeConfig.normalization={self.normalization!r}; choose one of "
                f"{NORMALIZATIONS}."
            )
        if self.flops_regularization < 0:
            raise ValueError(
                "IterativeConfig.flops_regularization must be >= 0, got "
                f"{self.flops_regularization}."
            )
        if self.scope not in SCOPES:
            raise ValueError(f"IterativeConfig.scope must be one of {SCOPES}, got {self.scope!r}.")
        for measure in MEASURES:
            target = getattr(self, f"target_{measure}")
            if target is not None and not 0.0 < target <= 1.0:
                raise ValueError(
                    f"IterativeConfig.target_{measure}={target} must lie in (0, 1]: it is the "
                    "fraction of the base model that remains."
                )
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(
                f"IterativeConfig.min_accuracy={self.min_accuracy} must lie in [0, 1]."
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"IterativeConfig.max_steps must be >= 0, got {self.max_steps}.")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise ValueError(
                f"IterativeConfig.eval_examples must be >= 1 or None (all), got "
                f"{self.eval_examples}."
            )
        targets = [getattr(self, f"target_{m}") for m in MEASURES]
        if all(t is None for t in targets) and self.min_accuracy is None and not self.max_steps:
            raise ValueError(
                "IterativeConfig has no stopping rule: set target_flops, target_macs, "
                "target_params, target_channels, min_accuracy or max_steps."
            )
        if self.optimizer.schedule != "constant" or self.optimizer.warmup_epochs:
            raise ValueError(
                "Iterative pruning fine-tunes with a constant learning rate (as the paper); set "
                "IterativeConfig.optimizer.schedule='constant' and warmup_epochs=0."
            )
        train.make_optimizer(self.optimizer, 1, 1.0)  # validates the optimizer's own fields

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """What a run derives from its inputs, fixed for the whole run."""

    config: IterativeConfig
    model: Model
    data: PruneData
    graph: ChannelGraph  # of the original model
    base: PyTree  # the shapes of the original variables
    base_cost: cost.CostReport
    scope: tuple[str, ...]
    tx: Any


def _criterion(config: IterativeConfig, step: int) -> criteria.Criterion:
    """The criterion of pruning step `step`; seeded criteria get a new seed every step."""
    options = dict(config.criterion_options)
    constructor = criteria.CRITERIA[config.criterion]
    if "seed" in inspect.signature(constructor).parameters:
        options["seed"] = int(options.get("seed", config.seed)) + step
    return criteria.get_criterion(config.criterion, **options)


def _target_reached(config: IterativeConfig, remaining: Mapping[str, float]) -> bool:
    return any(
        getattr(config, f"target_{m}") is not None
        and remaining[m] <= getattr(config, f"target_{m}") + 1e-12
        for m in MEASURES
    )


def _prepare(
    model: Model, variables: Mapping[str, PyTree], data: PruneData, config: IterativeConfig
) -> _Setup:
    graph = channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    scope = tuple(select_groups(graph, config.scope))
    if not scope:
        raise ValueError(
            f"The model has no prunable groups under scope={config.scope!r}; its groups are "
            f"{list(graph.names)} (use scope='all' to prune dense layers)."
        )
    return _Setup(
        config=config,
        model=model,
        data=data,
        graph=graph,
        base=structs(variables),
        base_cost=cost.count(model.apply_fn, variables, model.example_input, **model.eval_kwargs),
        scope=scope,
        # A constant schedule (checked), so the epoch length does not matter.
        tx=train.make_optimizer(config.optimizer, 1, 1.0),
    )


def _identity(config: IterativeConfig, variables: PyTree, data: PruneData) -> dict[str, Any]:
    """What makes a run this run: its config, the base variables and the data it reads."""
    first = [next(iter(data.validation()), None), next(iter(data.train(0)), None)]
    return {
        "config": config_identity(config, _COSMETIC),
        "variables": fingerprint(variables),
        "data": fingerprint([dict(b) for b in first if b is not None]),
    }


def _evaluate(setup: _Setup, model: Model, variables: PyTree) -> dict[str, float]:
    """Loss, accuracy and kappa on the validation data (its first `eval_examples`)."""
    return train.evaluate(
        model, variables, validation_batches(setup.data, setup.config.eval_examples)
    )


def _fresh(setup: _Setup, variables: PyTree) -> tuple[train.TrainState, Network, Progress]:
    keep = {g.name: np.arange(g.size) for g in setup.graph.groups}
    network = make_network(setup.model, setup.graph, setup.base, keep)
    state = train.create_train_state(
        network.model,
        setup.tx,
        jax.random.key(setup.config.seed),
        setup.model.example_input,
        masks=network.full_masks(),
        variables=variables,
    )
    base_validation = _evaluate(setup, state.model, state.variables())
    config = setup.config
    reason = None
    if _target_reached(config, dict.fromkeys(MEASURES, 1.0)):
        reason = "target"  # the base model already meets it: nothing to prune
    elif config.max_steps == 0:
        reason = "max_steps"
    progress = Progress(
        steps=0,
        stop_reason=reason,
        stop_update=0 if reason else None,
        stream=(0, 0),
        history=(),
        base_validation=base_validation,
    )
    return state, network, progress


def _select(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    scores: Mapping[str, np.ndarray],
) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """The k channels to remove this step (indices into the current physical groups), and the
    ranked scores they were chosen by."""
    config = setup.config
    # A group down to one channel is absent from the current graph: it has nothing to give.
    present = [name for name in setup.scope if name in network.graph.names]
    if not present:
        return [], {}
    scored = [name for name in present if name in scores]
    if not scored:
        raise ValueError(
            f"Criterion {config.criterion!r} gives no scores for the groups in scope "
            f"{present}; choose a criterion that applies to them."
        )
    flops_cost = None
    if config.flops_regularization > 0:
        alive = network.alive(state.masks)
        report = masked_cost(setup.model, setup.graph, setup.base, alive)
        flops_cost = flops_per_channel(report, setup.graph, scored)
    ranked = rank_scores(
        {name: scores[name] for name in scored},
        state.masks,
        normalization=config.normalization,
        flops_cost=flops_cost,
        flops_regularization=config.flops_regularization,
    )
    removals = choose_removals(
        ranked,
        state.masks,
        scored,
        config.channels_per_step,
        min_channels=config.min_channels,
        blocks={group.name: group.block for group in setup.graph.groups},
    )
    return removals, ranked


def _measure(
    setup: _Setup, network: Network, masks: Mapping[str, Any]
) -> tuple[cost.CostReport, dict[str, float], int]:
    """The cost of the model with its masked channels removed, the fraction left of each
    measure, and the channels left in scope."""
    alive = network.alive(masks)
    report = masked_cost(setup.model, setup.graph, setup.base, alive)
    base_channels = sum(setup.graph[name].size for name in setup.scope)
    channels = int(sum(alive[name].size for name in setup.scope))
    remaining = {
        "flops": report.flops / setup.base_cost.flops,
        "macs": report.macs / setup.base_cost.macs,
        "params": report.params / setup.base_cost.params,
        "channels": channels / base_channels,
    }
    return report, remaining, channels


def _stop_reason(
    config: IterativeConfig,
    step: int,
    removals: Sequence[tuple[str, int]],
    validation: Mapping[str, float] | None,
    remaining: Mapping[str, float],
) -> str | None:
    """Why pruning stops after this step, or None to go on."""
    if not removals:
        return "nothing_left"
    floor = config.min_accuracy
    if floor is not None and validation is not None and validation["accuracy"] < floor:
        return "accuracy_floor"
    if _target_reached(config, remaining):
        return "target"
    if config.max_steps is not None and step >= config.max_steps:
        return "max_steps"
    return None


def _pruning_step(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    stream: TrainStream,
    progress: Progress,
    clock: CompileClock,
    last_saved: int | None,
) -> tuple[train.TrainState, Network, Progress]:
    """One step: fine-tune and score, remove k channels, evaluate, maybe stop and shrink."""
    config = setup.config
    step = progress.steps + 1
    began = time.perf_counter()
    state, scores, times = finetune_and_score(
        state,
        stream,
        config.updates_per_step,
        network=network,
        criterion=_criterion(config, step),
        score_updates=config.score_updates,
        last_saved=last_saved,
        learning_rate=config.optimizer.learning_rate,
    )
    removals, ranked = _select(setup, state, network, scores or {})
    masks_before = state.masks
    if removals:
        state = state.replace(masks=remove_channels(state.masks, removals))
    began_cost = time.perf_counter()
    report, remaining, channels = _measure(setup, network, state.masks)
    times["cost_s"] = time.perf_counter() - began_cost

    validation = None
    if step % config.eval_every == 0 or config.min_accuracy is not None:
        began_eval = time.perf_counter()
        validation = _evaluate(setup, state.model, state.variables())
        times["eval_s"] = time.perf_counter() - began_eval

    reason = _stop_reason(config, step, removals, validation, remaining)
    reverted = reason == "accuracy_floor"
    if reverted:
        # The step that broke the floor is undone: the result keeps an accuracy above it.
        state = state.replace(masks=masks_before)
        report, remaining, channels = _measure(setup, network, state.masks)
    removed = [
        [name, int(network.keep[name][channel]), float(ranked[name][channel])]
        for name, channel in removals
    ]
    shrunk = reason is not None or (config.shrink_every and step % config.shrink_every == 0)
    if shrunk:
        began_shrink = time.perf_counter()
        state, network = shrink(state, network, setup.model, setup.graph, setup.base)
        times["shrink_s"] = time.perf_counter() - began_shrink
    compile_s, compiles = clock.take()
    record = {
        "step": step,
        "updates": int(state.step),
        "criterion": config.criterion,
        "removed": removed,
        "reverted": reverted,
        "remaining": remaining,
        "flops": report.flops,
        "macs": report.macs,
        "params": report.params,
        "channels": channels,
        "validation": validation,
        "shrunk": bool(shrunk),
        "time": {
            **times,
            "compile_s": compile_s,
            "compiles": compiles,
            "step_s": time.perf_counter() - began,
        },
    }
    progress = dataclasses.replace(
        progress,
        steps=step,
        stop_reason=reason,
        stop_update=int(state.step) if reason is not None else None,
        stream=stream.position,
        history=(*progress.history, record),
    )
    return state, network, progress


def _final_finetune(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    stream: TrainStream,
    progress: Progress,
    store: Any,
    last_saved: int | None,
) -> tuple[train.TrainState, Progress, dict[str, float]]:
    """The optional fine-tuning after the last pruning step, checkpointed in chunks of u."""
    config = setup.config
    end = progress.stop_update + config.final_updates
    totals = {"train_s": 0.0}
    chunk = config.updates_per_step * config.checkpoint_every
    while int(state.step) < end:
        updates = min(chunk, end - int(state.step))
        state, _, times = finetune_and_score(
            state,
            stream,
            updates,
            network=network,
            last_saved=last_saved,
            learning_rate=config.optimizer.learning_rate,
        )
        totals["train_s"] += times["train_s"]
        progress = dataclasses.replace(progress, stream=stream.position)
        save(store, state, network, progress)
        last_saved = int(state.step) if store is not None else None
    return state, progress, totals


def _step_values(record: Mapping[str, Any]) -> dict[str, float]:
    """One pruning step's live metrics: what is left of each measure, channels removed, and
    the validation loss and accuracy when the step evaluated."""
    values = {f"{m}_left": float(v) for m, v in record["remaining"].items()}
    values["removed"] = len(record["removed"])
    values["updates"] = int(record["updates"])
    if record["validation"] is not None:
        values.update({k: record["validation"][k] for k in ("loss", "accuracy")})
    return values


def _estimated_steps(config: IterativeConfig, history: Sequence[Mapping[str, Any]]) -> int | None:
    """How many pruning steps the run will take, for the progress bar's total and ETA.

    Pruning stops at the first target reached; each target's step count is extrapolated from
    the share of its measure removed so far (exact for a channel target, k channels a step),
    and `max_steps` caps them. None before the first step when only a target is known.
    """
    estimates = [config.max_steps] if config.max_steps else []
    if history:
        last = history[-1]
        for measure in MEASURES:
            target = getattr(config, f"target_{measure}")
            removed = 1.0 - last["remaining"][measure]
            if target is not None and removed > 0:
                estimates.append(math.ceil(last["step"] * (1.0 - target) / removed - 1e-9))
    if not estimates:
        return None
    return max(min(estimates), len(history))


def _describe(record: Mapping[str, Any], config: IterativeConfig) -> dict[str, str]:
    targets = {m: getattr(config, f"target_{m}") for m in MEASURES}
    shown = {"flops": f"{100 * record['remaining']['flops']:.1f}%"}
    for measure, target in targets.items():
        if target is not None:
            shown[measure] = f"{100 * record['remaining'][measure]:.1f}%/{100 * target:.0f}%"
    if record["validation"] is not None:
        shown["acc"] = f"{100 * record['validation']['accuracy']:.2f}%"
    return shown


def _cost_dict(report: cost.CostReport) -> dict[str, float]:
    return {"flops": report.flops, "macs": report.macs, "params": report.params}


def _summary(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    progress: Progress,
    validation: dict[str, float],
    finetune_time: Mapping[str, float],
) -> dict[str, Any]:
    model = setup.model
    final = cost.count(network.program, network.variables, model.example_input, **model.eval_kwargs)
    history = progress.history
    totals: dict[str, float] = {}
    for record in history:
        for key, value in record["time"].items():
            totals[key] = totals.get(key, 0) + value
    # Compilation happens in the first step and in the first step after each shrink.
    after_shrink = [
        history[i]["time"]["compile_s"] for i in range(1, len(history)) if history[i - 1]["shrunk"]
    ]
    steady = [r["time"]["step_s"] for r in history if r["time"]["compiles"] == 0]
    channels = sum(setup.graph[name].size for name in setup.scope)
    return {
        "cost": {"before": _cost_dict(setup.base_cost), "after": _cost_dict(final)},
        "validation": {"before": progress.base_validation, "after": validation},
        "method": {
            "name": "iterative",
            "criterion": setup.config.criterion,
            "stop_reason": progress.stop_reason,
            "pruning_steps": progress.steps,
            "updates": int(state.step),
            "channels": {
                "before": channels,
                "after": int(sum(network.keep[name].size for name in setup.scope)),
            },
            "remaining": (history[-1]["remaining"] if history else dict.fromkeys(MEASURES, 1.0)),
            "time": {
                **totals,
                **{f"finetune_{k}": v for k, v in finetune_time.items()},
                "compile_s_first_step": history[0]["time"]["compile_s"] if history else 0.0,
                "compile_s_after_shrinks": sum(after_shrink),
                "steady_step_s_median": float(np.median(steady)) if steady else None,
            },
        },
    }


def iterative_prune(
    model: Model,
    variables: Mapping[str, PyTree],
    data: Any,
    config: IterativeConfig = IterativeConfig(),
    *,
    workdir: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prunes a trained model greedily, k channels at a time, fine-tuning in between.

    Args:
      model: the model (`jaxprune.Model`: a linen or NNX module or any apply function, with
        its example input and calls); its widths may be hard-coded.
      variables: its trained variables (``{"params": ..., ...}``; every other collection,
        such as BatchNorm statistics, is updated in training as the model's call says).
      data: training epochs and validation batches (`methods.contract.as_prune_data`: a
        `PruneData`, a `jaxprune.data.Dataset` batched by `config.batch_size`, or a list of
        batches used for both). Fine-tuning reads ``data.train(epoch)``, every decision
        (accuracy floor, the history's metrics) ``data.validation()``; never the test split.
      config: the run (criterion, k, u, targets, fine-tuning, ...).
      workdir: where the run checkpoints (``checkpoints/prune/``) and writes ``result.json``;
        rerunning it resumes (a finished run is restored), and another run there is refused
        with the changed settings named.
      progress: show a progress bar (pruning steps, FLOPs left, validation accuracy).

    Returns:
      A `PruneResult`: its model runs the pruned program, its variables are the pruned and
      fine-tuned ones, `keep` holds the original channels kept of every group, `history` one
      record per pruning step (channels removed as (group, original index, normalised score),
      what remains of each measure, validation metrics, timings), and `summary` the cost and
      validation metrics before and after, with the method's report (stop reason, steps,
      updates, timings) under ``"method"``.

    Raises:
      ValueError: an invalid config or data; RunMismatchError: the workdir holds another run;
      DivergenceError: the fine-tuning diverged (the update, the loss and the checkpoint kept
      are named).
    """
    config.check()
    if "params" not in variables:
        raise ValueError(
            "variables must hold a 'params' collection (and the model's other collections, "
            f"such as 'batch_stats'), got collections {sorted(variables)}."
        )
    variables = {name: tree for name, tree in variables.items() if name != "masks"}
    data = as_prune_data(data, batch_size=config.batch_size, seed=config.seed)
    setup = _prepare(model, variables, data, config)
    identity = _identity(config, variables, data)
    with RunDir.maybe(workdir, kind="iterative", identity=identity) as run:
        store = run.checkpoints(SEQUENCE) if run is not None else None
        with CompileClock() as clock:
            restored = restore(
                store, model=model, original=setup.graph, base=setup.base, tx=setup.tx
            )
            state, network, position = restored or _fresh(setup, variables)
            last_saved = int(state.step) if restored is not None else None
            stream = TrainStream(data, *position.stream)
            metrics = open_metrics(run, position.steps)
            clock.take()
            bar = tqdm(
                total=_estimated_steps(config, position.history),
                initial=position.steps,
                unit="step",
                desc=f"pruning ({config.criterion})",
                disable=not progress,
                dynamic_ncols=True,
            )
            with bar:
                while position.stop_reason is None:
                    state, network, position = _pruning_step(
                        setup, state, network, stream, position, clock, last_saved
                    )
                    record = position.history[-1]
                    if metrics is not None:
                        metrics.write(record["step"], "prune", **_step_values(record))
                    bar.total = _estimated_steps(config, position.history)
                    bar.set_postfix(_describe(record, config), refresh=False)
                    bar.update(1)
                    release_compiled_programs_if_crowded()
                    if position.stop_reason is not None or (
                        position.steps % config.checkpoint_every == 0
                    ):
                        save(store, state, network, position)
                        last_saved = int(state.step) if store is not None else None
            state, position, finetune_time = _final_finetune(
                setup, state, network, stream, position, store, last_saved
            )
        pruned_model = model.with_apply_fn(network.program)
        pruned_variables = jax.device_get(plain_variables(state))
        validation = _evaluate(setup, pruned_model, pruned_variables)
        summary = _summary(setup, state, network, position, validation, finetune_time)
        write_result(metrics, position.steps + 1, summary)
        if run is not None:
            run.write_json("result.json", summary)
    return PruneResult(
        method="iterative",
        model=pruned_model,
        variables=pruned_variables,
        keep=dict(network.keep),
        graph=setup.graph,
        history=position.history,
        summary=summary,
    )
