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
change. Every `shrink_every` pruning steps, and at the end, the model is physically shrunk
(`surgery.prune`, with the optimizer momentum sliced alongside) and its channel graph rebuilt;
only then do the compiled programs change. Every pruning step can be checkpointed in a workdir;
a killed run resumes from its last checkpoint and ends exactly where an uninterrupted one ends.

Example:
  >>> from jaxprune import checkpoint, data
  >>> from jaxprune.methods.iterative import IterativeConfig, iterative_prune
  >>> model, variables, _ = checkpoint.load_model_file("vgg_small_fashion_mnist.msgpack")
  >>> dataset = data.load(data.DataConfig())
  >>> config = IterativeConfig(criterion="taylor", channels_per_step=8, target_flops=0.5)
  >>> result = iterative_prune(config, "vgg_small", variables, dataset, workdir="runs/taylor")
  >>> result.widths, result.summary["final"]["flops"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxprune import checkpoint as ckpt
from jaxprune import cost, criteria, train
from jaxprune import data as data_lib
from jaxprune.gates import gated_apply_fn
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.methods.oneshot import select_groups
from jaxprune.model import Model
from jaxprune.models import Rebuild, rebuild_fn, widths_from_params
from jaxprune.surgery import compose_keep, keep_to_masks, masks_to_keep, prune

ApplyFn = Callable[..., Any]
PyTree = Any

# Measures a target can be set on; each is the fraction of the base model's that remains.
MEASURES = ("flops", "macs", "params", "channels")
NORMALIZATIONS = ("l2", "none")
STOP_REASONS = ("target", "accuracy_floor", "max_steps", "nothing_left")
# Config fields that do not change a run's result: a resumed run may change them.
_COSMETIC_FIELDS = ("progress", "keep_checkpoints")
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


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
    # Mini-batch size of the fine-tuning (and of the criterion, which reads the same batches).
    batch_size: int = 32
    # SGD with momentum 0.9 in the paper; the schedule must be "constant".
    optimizer: train.OptimizerConfig = dataclasses.field(default_factory=_default_optimizer)
    # Evaluate on the validation split after every this-many pruning steps (the accuracy floor
    # is checked only then).
    eval_every: int = 1
    # Validation images of each evaluation (the first ones of the split); None: all.
    eval_examples: int | None = None
    # Batch size of evaluation.
    eval_batch_size: int = 500
    # Evaluate the final model on the test split.
    test_at_end: bool = True
    # Save a checkpoint every this many pruning steps (always at the end) when a workdir is set.
    checkpoint_every: int = 1
    # How many of the latest checkpoints the workdir keeps.
    keep_checkpoints: int = 2
    # Seed of the data order, dropout and random criteria.
    seed: int = 0
    # Show a progress bar (pruning steps, FLOPs left, validation accuracy) on stderr.
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Result:
    """What `iterative_prune` returns.

    Attributes:
      variables: the physically pruned variables, ``{"params": ..., "batch_stats": ...}``.
      widths: their width spec (`models.widths_from_params`), to rebuild a zoo model.
      keep: per group, the indices of the base model's channels that survive.
      history: one record per pruning step: channels removed (group, base index, normalised
        score), what remains of each measure, validation metrics, and timings (wall time of
        training, scoring, evaluation, shrinking, and of compilation).
      summary: the stop reason, the base and final cost, the last validation and the test
        metrics, and total timings.
    """

    variables: PyTree
    widths: dict[str, int]
    keep: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def check_config(config: IterativeConfig) -> None:
    """Raises ValueError naming the first invalid field of an `IterativeConfig`."""
    positive = ("updates_per_step", "channels_per_step", "min_channels", "batch_size")
    positive += ("eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"IterativeConfig.{name} must be >= 1, got {getattr(config, name)}.")
    for name in ("shrink_every", "final_updates", "seed"):
        if getattr(config, name) < 0:
            raise ValueError(f"IterativeConfig.{name} must be >= 0, got {getattr(config, name)}.")
    if config.criterion not in criteria.CRITERIA:
        raise ValueError(
            f"IterativeConfig.criterion={config.criterion!r} is not a registered criterion; "
            f"choose one of {', '.join(sorted(criteria.CRITERIA))}."
        )
    if config.score_updates is not None and not 1 <= config.score_updates <= (
        config.updates_per_step
    ):
        raise ValueError(
            f"IterativeConfig.score_updates={config.score_updates} must lie in 1.."
            f"{config.updates_per_step} (updates_per_step), or be None for all updates."
        )
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(
            f"IterativeConfig.normalization={config.normalization!r}; choose one of "
            f"{NORMALIZATIONS}."
        )
    if config.flops_regularization < 0:
        raise ValueError(
            f"IterativeConfig.flops_regularization must be >= 0, got {config.flops_regularization}."
        )
    if config.scope not in ("conv", "all"):
        raise ValueError(f"IterativeConfig.scope must be 'conv' or 'all', got {config.scope!r}.")
    for measure in MEASURES:
        target = getattr(config, f"target_{measure}")
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(
                f"IterativeConfig.target_{measure}={target} must lie in (0, 1]: it is the "
                "fraction of the base model that remains."
            )
    if config.min_accuracy is not None and not 0.0 <= config.min_accuracy <= 1.0:
        raise ValueError(f"IterativeConfig.min_accuracy={config.min_accuracy} must lie in [0, 1].")
    if config.max_steps is not None and config.max_steps < 0:
        raise ValueError(f"IterativeConfig.max_steps must be >= 0, got {config.max_steps}.")
    targets = [getattr(config, f"target_{m}") for m in MEASURES]
    if all(t is None for t in targets) and config.min_accuracy is None and not config.max_steps:
        raise ValueError(
            "IterativeConfig has no stopping rule: set target_flops, target_macs, "
            "target_params, target_channels, min_accuracy or max_steps."
        )
    if config.optimizer.schedule != "constant" or config.optimizer.warmup_epochs:
        raise ValueError(
            "Iterative pruning fine-tunes with a constant learning rate (as the paper); set "
            "IterativeConfig.optimizer.schedule='constant' and warmup_epochs=0."
        )


# ---------------------------------------------------------------------------------------------
# Ranking and selection (pure functions on {group: scores})
# ---------------------------------------------------------------------------------------------


def rank_scores(
    scores: Mapping[str, np.ndarray],
    masks: Mapping[str, Any],
    *,
    normalization: str = "l2",
    flops_cost: Mapping[str, Any] | None = None,
    flops_regularization: float = 0.0,
) -> dict[str, np.ndarray]:
    """The scores a global ranking compares: removed channels -inf, normalised, regularised.

    Args:
      scores: per group, one raw criterion score per channel (higher = more relevant).
      masks: per group, the current masks (1 kept, 0 removed); groups absent here keep all.
      normalization: "l2" (per-layer L2, the paper's) or "none".
      flops_cost: per group, the cost of one of its channels (MFLOPs); needed when
        `flops_regularization` > 0.
      flops_regularization: lambda of ``score - lambda * cost``.

    Returns:
      Per group, the ranked scores (-inf for removed channels).
    """
    masked = {}
    for name, values in scores.items():
        s = np.asarray(values, np.float64).copy()
        if name in masks:
            s[np.asarray(masks[name]) == 0] = -np.inf
        masked[name] = s
    if normalization == "l2":
        masked = criteria.normalize_l2(masked)
    elif normalization != "none":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
    if flops_regularization > 0:
        if flops_cost is None:
            raise ValueError("flops_regularization > 0 needs flops_cost (MFLOPs per channel).")
        masked = criteria.flops_regularize(masked, flops_cost, strength=flops_regularization)
    return masked


def choose_removals(
    ranked: Mapping[str, np.ndarray],
    masks: Mapping[str, Any],
    groups: Sequence[str],
    count: int,
    *,
    min_channels: int = 1,
) -> list[tuple[str, int]]:
    """The `count` lowest-ranked surviving channels over all `groups` (a global ranking).

    A group already down to `min_channels` survivors gives no more; ties go to the earlier
    group in `groups`, then to the lower channel index.

    Args:
      ranked: per group, one score per channel (e.g. from `rank_scores`); -inf entries that
        the masks mark as removed are skipped.
      masks: per group, the current masks (1 kept, 0 removed); groups absent here keep all.
      groups: the groups that may lose channels, in tie-breaking order.
      count: how many channels to remove (k).
      min_channels: the fewest channels a group may keep (>= 1).

    Returns:
      Up to `count` (group, channel) pairs, lowest score first; fewer when not enough
      channels can be removed.

    Raises:
      ValueError: a NaN score, an unknown group, or `min_channels` < 1.
    """
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1 (never empty a group), got {min_channels}.")
    candidates = []
    alive_count = {}
    for order, name in enumerate(groups):
        if name not in ranked:
            raise ValueError(f"No scores for group {name!r}; scored groups: {sorted(ranked)}.")
        values = np.asarray(ranked[name], np.float64)
        if np.isnan(values).any():
            raise ValueError(f"Scores of group {name!r} contain NaN; check the criterion.")
        alive = np.ones(values.size, bool) if name not in masks else np.asarray(masks[name]) != 0
        alive_count[name] = int(alive.sum())
        candidates += [(float(values[c]), order, int(c), name) for c in np.nonzero(alive)[0]]
    candidates.sort(key=lambda t: t[:3])
    chosen: list[tuple[str, int]] = []
    for _, _, channel, name in candidates:
        if len(chosen) == count:
            break
        if alive_count[name] > min_channels:
            chosen.append((name, channel))
            alive_count[name] -= 1
    return chosen


def remove_channels(
    masks: Mapping[str, Any], removals: Sequence[tuple[str, int]]
) -> dict[str, jax.Array]:
    """New masks with the given (group, channel) pairs set to 0; the inputs are not changed."""
    updated = {name: np.asarray(mask, np.float32).copy() for name, mask in masks.items()}
    for name, channel in removals:
        if updated[name][channel] == 0:
            raise ValueError(f"Channel {channel} of group {name!r} is already removed.")
        updated[name][channel] = 0.0
    return {name: jnp.asarray(mask) for name, mask in updated.items()}


# ---------------------------------------------------------------------------------------------
# The physical model of a shrink period, its cost, and shrinking
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
    """The model between two physical shrinks: one set of shapes, one set of compiled programs.

    Attributes:
      apply_fn: the plain apply function of the current widths.
      graph: its channel graph.
      gated_apply_fn: `apply_fn` reading masks from ``variables["masks"]`` (for `TrainState`).
      context: the scoring context of the criteria (eval-mode model, softmax cross-entropy).
    """

    apply_fn: ApplyFn
    graph: ChannelGraph
    gated_apply_fn: ApplyFn
    context: criteria.ScoringContext


def make_network(apply_fn: ApplyFn, variables: PyTree, example_input: jax.Array) -> Network:
    """Traces `apply_fn` once and builds everything a shrink period compiles against."""
    graph = channel_graph(apply_fn, variables, example_input)
    return Network(
        apply_fn, graph, gated_apply_fn(apply_fn, graph), criteria.ScoringContext(apply_fn, graph)
    )


def plain_variables(state: train.TrainState) -> dict[str, PyTree]:
    """The variables of a train state (every collection), without its masks."""
    return {"params": state.params, **state.collections}


def shrink(
    state: train.TrainState,
    network: Network,
    rebuild: Rebuild,
    example_input: jax.Array,
) -> tuple[train.TrainState, Network, dict[str, np.ndarray]]:
    """Removes the masked channels physically, with their optimizer momentum.

    Args:
      state: a train state whose `apply_fn` is ``network.gated_apply_fn`` and whose masks
        mark the removed channels.
      network: the current network.
      rebuild: maps a width spec to the apply function of a model of those widths.
      example_input: an input batch of the model's input shape.

    Returns:
      The state of the smaller model (all masks 1, momentum of the surviving channels kept,
      step and rng unchanged), its network, and the keep indices that were applied (indices
      into the channels before this shrink).
    """
    keep = masks_to_keep(state.masks)
    pruned = prune(
        plain_variables(state), network.graph, keep, opt_state=state.opt_state, optimizer=state.tx
    )
    smaller = make_network(rebuild(pruned.widths), pruned.variables, example_input)
    if set(smaller.graph.names) != set(network.graph.names):
        raise ValueError(
            f"The rebuilt model has channel groups {list(smaller.graph.names)}, the pruned one "
            f"had {list(network.graph.names)}: rebuild(widths) must build the same "
            "architecture with the given widths."
        )
    new_state = state.replace(
        params=pruned.variables["params"],
        collections={k: v for k, v in pruned.variables.items() if k != "params"},
        opt_state=pruned.opt_state,
        model=state.model.with_apply_fn(smaller.gated_apply_fn),
        masks=keep_to_masks(smaller.graph, {}),
    )
    return new_state, smaller, pruned.keep


def pruned_cost(
    network: Network,
    variables: PyTree,
    masks: Mapping[str, Any],
    rebuild: Rebuild,
    example_input: jax.Array,
    *,
    per_channel: bool = False,
) -> tuple[cost.CostReport, dict[str, float] | None]:
    """The cost of the model with its masked channels removed, computed from shapes only.

    Args:
      network: the current network; variables: its variables; masks: the current masks.
      rebuild: maps a width spec to an apply function.
      example_input: an input batch.
      per_channel: also return the MFLOPs one channel of each group costs in that model.

    Returns:
      The cost report of the pruned model, and the per-channel costs (or None).
    """
    keep = masks_to_keep(masks)
    abstract = jax.eval_shape(lambda v: prune(v, network.graph, keep).variables, variables)
    apply_fn = rebuild(widths_from_params(abstract["params"]))
    report = cost.count(apply_fn, abstract, example_input)
    if not per_channel:
        return report, None
    graph = channel_graph(apply_fn, abstract, example_input)
    return report, criteria.flops_per_channel(apply_fn, graph, abstract, example_input)


# ---------------------------------------------------------------------------------------------
# Data, evaluation and compile-time accounting
# ---------------------------------------------------------------------------------------------


def train_batches(
    dataset: Any, batch_size: int, seed: int, start: int, count: int, mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """Preprocessed training batches `start` .. `start + count - 1` of one endless stream.

    Update t reads batch ``t % n`` of epoch ``t // n`` (n batches per epoch), so the batches
    depend only on (seed, t): a resumed run reads what an uninterrupted one reads.
    """
    per_epoch = dataset.num_batches("train", batch_size, drop_remainder=True)
    t = start
    while t < start + count:
        epoch, index = divmod(t, per_epoch)
        batches = dataset.iterate(
            "train",
            batch_size,
            seed=seed,
            epoch=epoch,
            shuffle=True,
            drop_remainder=True,
            start_batch=index,
        )
        for batch in batches:
            if t >= start + count:
                return
            batch = train.shard_batch(batch, mesh)
            key = data_lib.augmentation_key(seed, epoch, index)
            images, labels = dataset.preprocess(batch["image"], batch["label"], key, train=True)
            yield {"image": images, "label": labels}
            t, index = t + 1, index + 1


def evaluate_split(
    model: Model,
    variables: PyTree,
    dataset: Any,
    split: str,
    *,
    batch_size: int,
    limit: int | None,
    mesh: Mesh,
) -> dict[str, float]:
    """Loss, accuracy and kappa of the (masked) model on the first `limit` images of a split."""

    def batches() -> Iterator[dict[str, np.ndarray]]:
        seen = 0
        for batch in dataset.iterate(split, batch_size, shuffle=False, drop_remainder=False):
            if limit is not None:
                if seen >= limit:
                    return
                batch = {k: v[: limit - seen] for k, v in batch.items()}
            seen += len(batch["label"])
            yield batch

    def preprocess(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images, _ = dataset.preprocess(batch["image"], batch["label"], train=False)
        return {**batch, "image": images}

    return train.evaluate(model, variables, batches(), mesh=mesh, preprocess=preprocess)


class CompileClock:
    """Sums the time JAX spends compiling (lowering + XLA), and counts the compilations.

    Use as a context manager around the work to watch; `take` returns what was spent since
    the previous `take`. An XLA compilation served from the persistent cache is counted too
    (it is cheaper); a call that reuses an already compiled program is not.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._count = 0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            self._seconds += duration
        if event == _BACKEND_COMPILE:
            self._count += 1

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def take(self) -> tuple[float, int]:
        """(seconds, compilations) since the last call."""
        spent = (self._seconds, self._count)
        self._seconds, self._count = 0.0, 0
        return spent


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Progress:
    """The JSON part of a run's position, checkpointed with its train state."""

    steps: int  # pruning steps done
    base_keep: dict[str, list[int]]  # base-model indices of the current physical channels
    stop_reason: str | None  # why pruning stopped; None while it goes on
    stop_update: int | None  # the update count when it stopped
    history: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """What a run derives from its inputs, fixed for the whole run."""

    config: IterativeConfig
    rebuild: Rebuild
    model_name: str
    dataset: Any
    example_input: jax.Array
    base_variables: PyTree
    base: Network
    base_cost: cost.CostReport
    scope: tuple[str, ...]
    tx: Any
    mesh: Mesh
    spec: ckpt.RunSpec
    fingerprint: str


def _criterion(config: IterativeConfig, step: int) -> criteria.Criterion:
    """The criterion of pruning step `step`; seeded criteria get a new seed every step."""
    options = dict(config.criterion_options)
    constructor = criteria.CRITERIA[config.criterion]
    if "seed" in inspect.signature(constructor).parameters:
        options["seed"] = int(options.get("seed", config.seed)) + step
    return criteria.get_criterion(config.criterion, **options)


def _channels_left(masks: Mapping[str, Any], scope: Sequence[str]) -> int:
    return int(sum(np.count_nonzero(np.asarray(masks[name])) for name in scope))


def _target_reached(config: IterativeConfig, remaining: Mapping[str, float]) -> bool:
    return any(
        getattr(config, f"target_{m}") is not None
        and remaining[m] <= getattr(config, f"target_{m}") + 1e-12
        for m in MEASURES
    )


def _initial_state(
    setup: _Setup, network: Network, variables: PyTree, rng: jax.Array
) -> train.TrainState:
    model = Model.from_apply(
        network.gated_apply_fn, setup.example_input, train_flag="train", variables=variables
    )
    return train.create_train_state(
        model,
        setup.tx,
        rng,
        setup.example_input,
        masks=keep_to_masks(network.graph, {}),
        variables=variables,
    )


def _prepare(
    config: IterativeConfig, model: str | Rebuild, variables: PyTree, dataset: Any
) -> _Setup:
    check_config(config)
    rebuild = rebuild_fn(model, dataset.num_classes)
    model_name = model if isinstance(model, str) else ""
    if "params" not in variables:
        raise ValueError(
            "variables must hold a 'params' collection (and 'batch_stats' for BatchNorm "
            f"models), got collections {sorted(variables)}."
        )
    base_variables = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
    }
    example_input = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    base = make_network(
        rebuild(widths_from_params(base_variables["params"])), base_variables, example_input
    )
    scope = tuple(select_groups(base.graph, config.scope))
    if not scope:
        raise ValueError(
            f"The model has no prunable groups under scope={config.scope!r}; its groups are "
            f"{list(base.graph.names)} (use scope='all' to prune dense layers)."
        )
    mesh = train.make_mesh()
    train.check_batch_size(config.batch_size, mesh)
    per_epoch = dataset.num_batches("train", config.batch_size, drop_remainder=True)
    tx = train.make_optimizer(config.optimizer, per_epoch, 1.0)
    spec = ckpt.RunSpec(
        model_name or "custom",
        dataset.num_classes,
        tuple(dataset.image_shape),
        config.optimizer,
        per_epoch,
        1.0,
    )
    return _Setup(
        config=config,
        rebuild=rebuild,
        model_name=model_name,
        dataset=dataset,
        example_input=example_input,
        base_variables=base_variables,
        base=base,
        base_cost=cost.count(base.apply_fn, base_variables, example_input),
        scope=scope,
        tx=tx,
        mesh=mesh,
        spec=spec,
        fingerprint=ckpt.tree_fingerprint(base_variables),
    )


def _fresh(setup: _Setup) -> tuple[train.TrainState, Network, _Progress]:
    state = _initial_state(
        setup, setup.base, setup.base_variables, jax.random.key(setup.config.seed)
    )
    base_keep = {g.name: list(range(g.size)) for g in setup.base.graph.groups}
    return train.replicate(state, setup.mesh), setup.base, _Progress(0, base_keep, None, None, ())


def _network_for(setup: _Setup, base_keep: Mapping[str, Sequence[int]]) -> tuple[Network, Any]:
    """The network and abstract variables of the base model shrunk to `base_keep`."""
    keep = {name: np.asarray(indices, np.int64) for name, indices in base_keep.items()}
    abstract = jax.eval_shape(
        lambda v: prune(v, setup.base.graph, keep).variables, setup.base_variables
    )
    apply_fn = setup.rebuild(widths_from_params(abstract["params"]))
    return make_network(apply_fn, abstract, setup.example_input), abstract


def _restore(setup: _Setup, manager: Any) -> tuple[train.TrainState, Network, _Progress] | None:
    step = manager.latest_step()
    if step is None:
        return None
    meta = ckpt.restore_meta(manager, step)
    where = Path(manager.directory) / str(step)
    extra = meta.get("extra", {})
    ckpt.check_same_run(
        where,
        stored_fingerprint=extra.get("base_fingerprint"),
        fingerprint=setup.fingerprint,
        stored_config=meta.get("config") or {},
        config=setup.config.to_dict(),
        config_name="IterativeConfig",
        ignore=_COSMETIC_FIELDS,
        whole=("criterion_options",),
    )
    progress = _Progress(
        steps=int(extra["steps"]),
        base_keep={k: list(v) for k, v in extra["base_keep"].items()},
        stop_reason=extra["stop_reason"],
        stop_update=extra["stop_update"],
        history=tuple(meta["history"]),
    )
    network, abstract = _network_for(setup, progress.base_keep)
    target = jax.eval_shape(
        lambda v: _initial_state(setup, network, v, jax.random.key(0)), abstract
    )
    sharding = NamedSharding(setup.mesh, P())
    if setup.model_name:
        state = ckpt.restore_checkpoint(manager, step=step, target=target, sharding=sharding).state
    else:
        # restore_checkpoint rebuilds a zoo model from the stored spec; a user's model has none,
        # so its arrays are read directly into the target built above.
        where = f"{manager.directory} step {step}"
        state = ckpt.restore_state(manager, step, target, where=where, sharding=sharding)
    return state, network, progress


def _save(setup: _Setup, manager: Any, state: train.TrainState, progress: _Progress) -> None:
    if manager is None:
        return
    extra = {
        "method": "iterative",
        "steps": progress.steps,
        "base_keep": progress.base_keep,
        "stop_reason": progress.stop_reason,
        "stop_update": progress.stop_update,
        "base_fingerprint": setup.fingerprint,
    }
    ckpt.save_checkpoint(
        manager,
        state,
        setup.spec,
        config=setup.config.to_dict(),
        history=list(progress.history),
        extra=extra,
    )


def _finetune_and_score(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    criterion: criteria.Criterion | None,
    updates: int,
) -> tuple[train.TrainState, Any, dict[str, float]]:
    """`updates` SGD updates; the criterion reads the batches of the last `score_updates`."""
    config = setup.config
    score_from = updates - (config.score_updates or updates)
    times = {"train_s": 0.0, "score_s": 0.0}
    scores_state = None
    if criterion is not None:
        scores_state = criterion.init(network.context, plain_variables(state), state.masks)
    start = int(state.step)
    batches = train_batches(
        setup.dataset, config.batch_size, config.seed, start, updates, setup.mesh
    )
    for index, batch in enumerate(batches):
        if criterion is not None and criterion.uses_batches and index >= score_from:
            began = time.perf_counter()
            scores_state = criterion.update(
                scores_state, network.context, plain_variables(state), batch, state.masks
            )
            times["score_s"] += time.perf_counter() - began
        began = time.perf_counter()
        state, metrics = train.train_step(state, batch)
        loss = float(metrics["loss"])  # waits for the step, so the timing is the step's
        times["train_s"] += time.perf_counter() - began
        if not (math.isfinite(loss) and math.isfinite(float(metrics["grad_norm"]))):
            raise FloatingPointError(
                f"fine-tuning diverged at update {start + index + 1} (loss {loss}); lower "
                f"IterativeConfig.optimizer.learning_rate ({config.optimizer.learning_rate})."
            )
    scores = None
    if criterion is not None:
        began = time.perf_counter()
        scores = criterion.finalize(
            scores_state, network.context, plain_variables(state), state.masks
        )
        times["score_s"] += time.perf_counter() - began
    return state, scores, times


def _select(
    setup: _Setup, state: train.TrainState, network: Network, scores: Mapping[str, np.ndarray]
) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """The k channels to remove this step, and the ranked scores they were chosen by."""
    config = setup.config
    scope = [name for name in setup.scope if name in scores]
    if not scope:
        raise ValueError(
            f"Criterion {config.criterion!r} gives no scores for the groups in scope "
            f"{list(setup.scope)}; choose a criterion that applies to them."
        )
    flops_cost = None
    if config.flops_regularization > 0:
        _, flops_cost = pruned_cost(
            network,
            plain_variables(state),
            state.masks,
            setup.rebuild,
            setup.example_input,
            per_channel=True,
        )
    ranked = rank_scores(
        {name: scores[name] for name in scope},
        state.masks,
        normalization=config.normalization,
        flops_cost=flops_cost,
        flops_regularization=config.flops_regularization,
    )
    removals = choose_removals(
        ranked, state.masks, scope, config.channels_per_step, min_channels=config.min_channels
    )
    return removals, ranked


def _measure(
    setup: _Setup, state: train.TrainState, network: Network
) -> tuple[cost.CostReport, dict[str, float]]:
    """The cost of the model with its masked channels removed, and the fraction left of each
    measure."""
    report, _ = pruned_cost(
        network, plain_variables(state), state.masks, setup.rebuild, setup.example_input
    )
    base_channels = sum(setup.base.graph[name].size for name in setup.scope)
    channels = _channels_left(state.masks, setup.scope)
    remaining = {
        "flops": report.flops / setup.base_cost.flops,
        "macs": report.macs / setup.base_cost.macs,
        "params": report.params / setup.base_cost.params,
        "channels": channels / base_channels,
    }
    return report, remaining


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
    progress: _Progress,
    clock: CompileClock,
) -> tuple[train.TrainState, Network, _Progress]:
    """One step: fine-tune and score, remove k channels, evaluate, maybe stop and shrink."""
    config = setup.config
    step = progress.steps + 1
    began = time.perf_counter()
    state, scores, times = _finetune_and_score(
        setup, state, network, _criterion(config, step), config.updates_per_step
    )
    removals, ranked = _select(setup, state, network, scores)
    masks_before = state.masks
    state = state.replace(masks=train.replicate(remove_channels(state.masks, removals), setup.mesh))
    began_cost = time.perf_counter()
    report, remaining = _measure(setup, state, network)
    times["cost_s"] = time.perf_counter() - began_cost

    validation = None
    if step % config.eval_every == 0 or config.min_accuracy is not None:
        began_eval = time.perf_counter()
        validation = evaluate_split(
            state.model,
            state.variables(),
            setup.dataset,
            "validation",
            batch_size=config.eval_batch_size,
            limit=config.eval_examples,
            mesh=setup.mesh,
        )
        times["eval_s"] = time.perf_counter() - began_eval

    reason = _stop_reason(config, step, removals, validation, remaining)
    reverted = reason == "accuracy_floor"
    if reverted:
        # The step that broke the floor is undone: the result keeps an accuracy above it.
        state = state.replace(masks=masks_before)
        report, remaining = _measure(setup, state, network)
    base_keep = {k: np.asarray(v) for k, v in progress.base_keep.items()}
    removed = [
        [name, int(base_keep[name][channel]), float(ranked[name][channel])]
        for name, channel in removals
    ]
    shrunk = reason is not None or (config.shrink_every and step % config.shrink_every == 0)
    if shrunk:
        began_shrink = time.perf_counter()
        state, network, applied = shrink(state, network, setup.rebuild, setup.example_input)
        state = train.replicate(state, setup.mesh)
        base_keep = compose_keep(base_keep, applied)
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
        "channels": _channels_left(state.masks, setup.scope),
        "validation": validation,
        "shrunk": bool(shrunk),
        "time": {
            **times,
            "compile_s": compile_s,
            "compiles": compiles,
            "step_s": time.perf_counter() - began,
        },
    }
    progress = _Progress(
        steps=step,
        base_keep={k: [int(i) for i in v] for k, v in base_keep.items()},
        stop_reason=reason,
        stop_update=int(state.step) if reason is not None else None,
        history=(*progress.history, record),
    )
    return state, network, progress


def _describe(record: Mapping[str, Any], config: IterativeConfig) -> dict[str, str]:
    targets = {m: getattr(config, f"target_{m}") for m in MEASURES}
    shown = {"flops": f"{100 * record['remaining']['flops']:.1f}%"}
    for measure, target in targets.items():
        if target is not None:
            shown[measure] = f"{100 * record['remaining'][measure]:.1f}%/{100 * target:.0f}%"
    if record["validation"] is not None:
        shown["acc"] = f"{100 * record['validation']['accuracy']:.2f}%"
    return shown


def _summary(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    progress: _Progress,
    test: dict[str, float] | None,
    finetune_time: Mapping[str, float],
) -> dict[str, Any]:
    final, _ = pruned_cost(
        network, plain_variables(state), state.masks, setup.rebuild, setup.example_input
    )
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
    last_validation = next((r["validation"] for r in reversed(history) if r["validation"]), None)
    return {
        "stop_reason": progress.stop_reason,
        "pruning_steps": progress.steps,
        "updates": int(state.step),
        "base": {
            "flops": setup.base_cost.flops,
            "macs": setup.base_cost.macs,
            "params": setup.base_cost.params,
        },
        "final": {
            "flops": final.flops,
            "macs": final.macs,
            "params": final.params,
            "remaining": history[-1]["remaining"] if history else dict.fromkeys(MEASURES, 1.0),
        },
        "validation": last_validation,
        "test": test,
        "time": {
            **totals,
            **{f"finetune_{k}": v for k, v in finetune_time.items()},
            "compile_s_first_step": history[0]["time"]["compile_s"] if history else 0.0,
            "compile_s_after_shrinks": sum(after_shrink),
            "steady_step_s_median": float(np.median(steady)) if steady else None,
        },
    }


def iterative_prune(
    config: IterativeConfig,
    model: str | Rebuild,
    variables: PyTree,
    dataset: Any,
    *,
    workdir: str | Path | None = None,
) -> Result:
    """Prunes a trained model greedily, k channels at a time, fine-tuning in between.

    Args:
      config: the run (criterion, k, u, targets, fine-tuning, ...).
      model: a zoo model name (rebuilt with ``build_model(name, dataset.num_classes, widths)``
        at every physical shrink), or for your own model a callable ``rebuild(widths) ->
        apply_fn`` returning the apply function of the model with those widths (a width spec as
        read by `models.widths_from_params`).
      variables: the trained model's variables (``{"params", "batch_stats"}``).
      dataset: a `jaxprune.data.Dataset` (or an object with its ``iterate``, ``num_batches``,
        ``preprocess``, ``num_classes`` and ``image_shape``). Fine-tuning reads "train", every
        decision "validation", the final report "test".
      workdir: if given, every pruning step is checkpointed in ``workdir/checkpoints`` and a
        rerun resumes from the last one (a finished run is restored and evaluated again).

    Returns:
      The pruned variables, widths, kept base-model channels, per-step history and summary.

    Raises:
      ValueError: an invalid config or model; CheckpointError: the workdir belongs to another
      run; FloatingPointError: the fine-tuning diverged.
    """
    setup = _prepare(config, model, variables, dataset)
    manager = None
    if workdir is not None:
        manager = ckpt.open_checkpoints(
            Path(workdir) / "checkpoints", max_to_keep=config.keep_checkpoints, cleanup_tmp=True
        )
    try:
        with CompileClock() as clock:
            restored = _restore(setup, manager) if manager is not None else None
            state, network, progress = restored or _fresh(setup)
            if progress.steps == 0 and progress.stop_reason is None:
                state, network, progress = _stop_if_done_already(setup, state, network, progress)
            clock.take()
            bar = tqdm(
                total=config.max_steps,
                initial=progress.steps,
                unit="step",
                desc=f"pruning ({config.criterion})",
                disable=not config.progress,
                dynamic_ncols=True,
            )
            with bar:
                while progress.stop_reason is None:
                    state, network, progress = _pruning_step(setup, state, network, progress, clock)
                    bar.set_postfix(_describe(progress.history[-1], config), refresh=False)
                    bar.update(1)
                    if progress.stop_reason is not None or (
                        progress.steps % config.checkpoint_every == 0
                    ):
                        _save(setup, manager, state, progress)
            state, finetune_time = _final_finetune(setup, state, network, progress, manager)
        test = None
        if config.test_at_end:
            test = evaluate_split(
                state.model,
                state.variables(),
                dataset,
                "test",
                batch_size=config.eval_batch_size,
                limit=None,
                mesh=setup.mesh,
            )
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    keep = {k: np.asarray(v, np.int64) for k, v in progress.base_keep.items()}
    plain = jax.device_get(plain_variables(state))
    return Result(
        variables=plain,
        widths=widths_from_params(plain["params"]),
        keep=keep,
        history=list(progress.history),
        summary=_summary(setup, state, network, progress, test, finetune_time),
    )


def _stop_if_done_already(
    setup: _Setup, state: train.TrainState, network: Network, progress: _Progress
) -> tuple[train.TrainState, Network, _Progress]:
    """A target the base model already meets (e.g. target 1.0, max_steps 0) prunes nothing."""
    config = setup.config
    remaining = dict.fromkeys(MEASURES, 1.0)
    if _target_reached(config, remaining) or config.max_steps == 0:
        reason = "target" if _target_reached(config, remaining) else "max_steps"
        return state, network, dataclasses.replace(progress, stop_reason=reason, stop_update=0)
    return state, network, progress


def _final_finetune(
    setup: _Setup,
    state: train.TrainState,
    network: Network,
    progress: _Progress,
    manager: Any,
) -> tuple[train.TrainState, dict[str, float]]:
    """The optional fine-tuning after the last pruning step, checkpointed in chunks of u."""
    config = setup.config
    end = progress.stop_update + config.final_updates
    totals = {"train_s": 0.0}
    chunk = config.updates_per_step * config.checkpoint_every
    while int(state.step) < end:
        updates = min(chunk, end - int(state.step))
        state, _, times = _finetune_and_score(setup, state, network, None, updates)
        totals["train_s"] += times["train_s"]
        _save(setup, manager, state, progress)
    return state, totals
