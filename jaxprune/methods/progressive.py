"""Layer-by-layer kernel elimination with progressive retraining (Osaku et al., PRL 2021).

"Convolutional Neural Network Simplification with Progressive Retraining" (arXiv 2101.04699)
simplifies a trained CNN one convolutional layer at a time, from the first to the last. For
layer l:

1. score its kernels (`progressive_choice`): the *objective* criterion is the loss with each
   kernel removed alone (the registered criterion "oracle_loss"); the kernels whose removal
   leaves the lowest loss go. Any registered criterion can stand in (the paper's baselines are
   "l1" and "apoz"). The *subjective* criterion is a person's choice on the kernel-selection
   page ("subjective"), replayed from a selection file or asked for through a chooser
   (`progressive_choice.waiting_chooser`); "standin" is a scripted rule that imitates that
   choice and is labelled as such;
2. remove p of them: a fraction (the paper's 5%, floored as the authors' code does), a count,
   or one value per layer;
3. retrain (`progressive_retrain`): *progressive* retraining trains layers 1..l+1 only, to
   reproduce the output of layer l+1 of the model before layer l was pruned (MSE, as the
   authors' code; cross-entropy as an option), SGD with Nesterov momentum 0.9 and a learning
   rate per layer; *complete* retraining (the paper's ablation) trains everything on the
   cross-entropy at a fixed rate (the authors' 1e-5); "none" skips it.

An optional final step (`progressive_final`) re-initialises every dense layer (Glorot-uniform,
as the authors' code) and fine-tunes the whole network.

After each layer the model is the pruned program of the original (`jaxprune.prune`, no module
rebuild): the method keeps the original graph and the cumulative keep. With a workdir the run
is one `RunDir` of kind "progressive": one checkpoint per layer (the variables, the keep and
the history so far) and the final fine-tuning's own checkpoints; a killed run resumes and ends
identical to an uninterrupted one, since layer l reads the data's epochs l * retrain_epochs
onwards and every choice is a function of the data and the variables.

What the paper leaves open, or what differs from it, and what jaxprune does (each a
`ProgressiveConfig` field):

- the criterion reads `score_examples` *validation* images (the method contract: choices read
  validation data); the paper's objective criterion reads the whole training set;
  `progressive_choice.split_half_reliability` (``reliability=True``) reports how stable its
  ranking is on that many images;
- how a fraction p becomes a count: floored (``rounding="floor"``, the authors' ``int(p*n)``;
  "nearest" as an option), and no layer keeps fewer than `min_channels` kernels;
- the target and the student run in inference mode (no dropout: the authors' partial model has
  none); BatchNorm, which the paper's VGG-16 lacks, keeps its running statistics frozen
  (``batch_norm="frozen"``), or re-estimates those of the retrained layers
  (``"recalibrate"``, ours);
- layer l+1 of the last convolution: the first dense layer after it (its activation is the
  target); with no later group, the logits;
- retraining batches of `batch_size` images (the paper: 8), cut from the data's batches.

Example:
  >>> model = jp.Model.linen(module, x, variables=variables)
  >>> config = ProgressiveConfig(criterion="oracle_loss", retrain_examples=2048)
  >>> result = progressive_prune(model, variables, dataset, config, workdir="runs/osaku")
  >>> logits = result.model(result.variables, x)  # the pruned program
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxprune import checkpoint as ckpt
from jaxprune import cost, criteria, train
from jaxprune.methods import progressive_choice as choice
from jaxprune.methods import progressive_final as final
from jaxprune.methods import progressive_retrain as retraining
from jaxprune.methods import selection_file
from jaxprune.methods.contract import PruneResult, as_prune_data
from jaxprune.methods.live import open_metrics, write_result
from jaxprune.methods.progressive_choice import Chooser, LayerView
from jaxprune.methods.progressive_retrain import Network
from jaxprune.methods.selection import select_groups
from jaxprune.model import Model
from jaxprune.run import Checkpoints, RunDir, config_identity, fingerprint
from jaxprune.runtime import release_compiled_programs_if_crowded
from jaxprune.surgery import compose_keep, prune, pruned_program

__all__ = [
    "PAPER_COMPLETE_LEARNING_RATE",
    "PAPER_LEARNING_RATES",
    "ProgressiveConfig",
    "progressive_prune",
]

PyTree = Any
# Kernel choices that are not registered criteria.
HUMAN_CRITERIA = ("subjective", "standin")
RETRAINING = ("progressive", "complete", "none")
# The authors' learning rates of progressive retraining (oPPR): 1e-5 for layer 1, 1e-6 for
# layers 2-3, 1e-7 for 4-6, 1e-8 after; as (first 0-based layer index, rate) breakpoints.
PAPER_LEARNING_RATES = ((0, 1e-5), (1, 1e-6), (3, 1e-7), (6, 1e-8))
# The authors' complete retraining: every layer at a fixed 1e-5.
PAPER_COMPLETE_LEARNING_RATE = 1e-5
# Config fields that do not change a run's result: a resumed run may change them.
_COSMETIC = ("checkpoint_every",)
_LAYERS = "layers"  # the checkpoint sequence of the layers


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig:
    """One progressive-simplification run (JSON-serialisable with `to_dict`)."""

    # How kernels are chosen: a registered criterion ("oracle_loss", the paper's objective
    # criterion; "l1", "apoz", "taylor", ...), "subjective" (a person: the `selection` file,
    # then the run's chooser) or "standin" (a scripted rule in place of the person).
    criterion: str = "oracle_loss"
    # Keyword options of a registered criterion, e.g. {"mode": "mask"} for the oracle.
    criterion_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # p: the fraction of each layer's kernels removed (the paper's 5%).
    ratio: float = 0.05
    # How a fraction becomes a count: "floor" (the authors' int(p * n)) or "nearest".
    rounding: str = "floor"
    # p as a count of kernels per layer instead; overrides `ratio` when set.
    count: int | None = None
    # p per simplified layer, in order: an int is a count, a float a fraction. Overrides both.
    per_layer: tuple[float | int, ...] | None = None
    # The groups simplified, first to last; None: every convolution group in model order.
    layers: tuple[str, ...] | None = None
    # No layer keeps fewer kernels than this.
    min_channels: int = 1
    # Validation images the criterion reads (the first ones; the paper: the whole training
    # set); None: all of them.
    score_examples: int | None = 512
    # Batch size of scoring and of evaluation.
    score_batch_size: int = 128
    # Also report, per layer, the split-half reliability of the criterion's ranking on those
    # images (scores each half once more).
    reliability: bool = False
    # "progressive" (layers 1..l+1), "complete" (every layer, cross-entropy) or "none".
    retraining: str = "progressive"
    # Loss of progressive retraining: "mse" (layer l+1's output vs. the model before pruning
    # layer l, the authors' code) or "cross_entropy" (the labels, through the frozen rest).
    loss: str = "mse"
    # BatchNorm while retraining: "frozen" (running statistics unchanged; the paper's VGG-16
    # has no BatchNorm) or "recalibrate" (those of the retrained layers re-estimated after the
    # weights, on the same images). Dropout is always off (inference mode).
    batch_norm: str = "frozen"
    # Progressive retraining's learning rate per layer, as (first 0-based layer index, rate)
    # breakpoints (the authors').
    learning_rates: tuple[tuple[int, float], ...] = PAPER_LEARNING_RATES
    # Complete retraining's learning rate for every layer (the authors' 1e-5); None: the
    # per-layer `learning_rates`.
    complete_learning_rate: float | None = PAPER_COMPLETE_LEARNING_RATE
    # SGD momentum and Nesterov (the paper: Nesterov, 0.9).
    momentum: float = 0.9
    nesterov: bool = True
    # Retraining batch size (the paper: 8; None: the data's batches) and epochs per layer
    # (the paper: 1).
    batch_size: int | None = 8
    retrain_epochs: int = 1
    # Training images per retraining epoch (the first of each epoch); None: all.
    retrain_examples: int | None = None
    # Epochs of the final fine-tuning of the whole network (oPPR: 50); 0: no final step.
    final_finetune_epochs: int = 0
    # Its fixed learning rate (oPPR: 1e-5), batch size (oPPR: 8; None: the data's) and
    # training images per epoch (None: all).
    final_learning_rate: float = 1e-5
    final_batch_size: int | None = 8
    final_examples: int | None = None
    # Dense layers re-initialised (Glorot-uniform) before it: "dense" (every one, oPPR),
    # "head" (the logits layer `head_layer` only) or "none".
    final_reinit: str = "dense"
    # The params path of the logits layer, e.g. "head" or "classifier/out".
    head_layer: str = "head"
    # Subjective criterion: a selection file or directory (`methods.selection_file`),
    # consulted before the chooser.
    selection: str = ""
    # Validation images the stand-in and a chooser's page show per kernel (the first ones).
    sample_images: int = 16
    # Validation images evaluated after every layer (the first ones); 0: no evaluation.
    eval_examples: int = 1000
    # Seed of random criteria, the retraining's key and the final step's draws.
    seed: int = 0
    # Steps between two checkpoints of the final fine-tuning (with a workdir).
    checkpoint_every: int = 200

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def check(self) -> None:
        """Checks every field that needs no model or data.

        Raises:
          ValueError: naming the first invalid field and what it accepts.
        """
        if self.criterion not in criteria.CRITERIA and self.criterion not in HUMAN_CRITERIA:
            raise ValueError(
                f"ProgressiveConfig.criterion={self.criterion!r} is neither a registered "
                f"criterion ({', '.join(sorted(criteria.CRITERIA))}) nor one of "
                f"{HUMAN_CRITERIA}."
            )
        choices = {
            "retraining": RETRAINING,
            "loss": retraining.LOSSES,
            "batch_norm": retraining.BATCH_NORM,
            "rounding": choice.ROUNDINGS,
            "final_reinit": final.REINIT,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ProgressiveConfig.{name}={getattr(self, name)!r}; choose one of {allowed}."
                )
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"ProgressiveConfig.ratio={self.ratio} must lie in [0, 1): it is the fraction "
                "of each layer's kernels removed."
            )
        if self.count is not None and (_not_int(self.count) or self.count < 0):
            raise ValueError(f"ProgressiveConfig.count must be an int >= 0, got {self.count!r}.")
        for value in self.per_layer or ():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"ProgressiveConfig.per_layer holds {value!r}; write each layer's p as an "
                    "int (a count) or a float (a fraction)."
                )
            if isinstance(value, float) and not 0.0 <= value < 1.0:
                raise ValueError(
                    f"ProgressiveConfig.per_layer holds the fraction {value}; fractions lie in "
                    "[0, 1) (write counts as ints)."
                )
            if isinstance(value, int) and value < 0:
                raise ValueError(f"ProgressiveConfig.per_layer holds the count {value}; use >= 0.")
        for name in ("min_channels", "score_batch_size", "sample_images", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"ProgressiveConfig.{name} must be >= 1, got {getattr(self, name)}."
                )
        optional = ("score_examples", "batch_size", "retrain_examples", "final_batch_size")
        for name in (*optional, "final_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ProgressiveConfig.{name} must be >= 1 or None, got {value}.")
        for name in ("retrain_epochs", "final_finetune_epochs", "eval_examples", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"ProgressiveConfig.{name} must be >= 0, got {getattr(self, name)}."
                )
        if not self.learning_rates or min(first for first, _ in self.learning_rates) != 0:
            raise ValueError(
                f"ProgressiveConfig.learning_rates={self.learning_rates} must be (first layer "
                "index, rate) pairs starting at layer 0, e.g. ((0, 1e-5), (1, 1e-6))."
            )
        rates = [rate for _, rate in self.learning_rates] + [self.final_learning_rate]
        if self.complete_learning_rate is not None:
            rates.append(self.complete_learning_rate)
        if any(not rate > 0 for rate in rates):
            raise ValueError("ProgressiveConfig learning rates must be > 0.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"ProgressiveConfig.momentum must lie in [0, 1), got {self.momentum}.")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def removal_count(config: ProgressiveConfig, layer_index: int, size: int) -> int:
    """How many kernels layer `layer_index` (0-based, of `size` kernels) loses.

    Args:
      config: the run (`per_layer`, `count`, `ratio`, `rounding`, `min_channels`).
      layer_index: the position of the layer among the simplified ones.
      size: its current number of kernels.

    Returns:
      p as a count: `per_layer`, else `count`, else `ratio` of `size` (floored by default, as
      the authors' code), never leaving fewer than `min_channels` kernels.

    Raises:
      ValueError: `per_layer` has no entry for this layer.
    """
    if config.per_layer is not None:
        if layer_index >= len(config.per_layer):
            raise ValueError(
                f"ProgressiveConfig.per_layer has {len(config.per_layer)} entries but layer "
                f"{layer_index} is simplified; give one entry per simplified layer."
            )
        value = config.per_layer[layer_index]
    elif config.count is not None:
        value = config.count
    else:
        value = config.ratio
    return choice.removal_count(
        value, size, rounding=config.rounding, min_channels=config.min_channels
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
    config: ProgressiveConfig
    model: Model
    base: Network
    data: Any
    layers: tuple[str, ...]
    score_batches: tuple[dict[str, np.ndarray], ...]
    eval_batches: tuple[dict[str, np.ndarray], ...]
    sample_images: np.ndarray
    fingerprint: str
    choose: Chooser | None
    progress: bool


@dataclasses.dataclass(frozen=True)
class _State:
    layers_done: int
    keep: dict[str, list[int]]  # per group of the original graph, the kept channels
    history: tuple[dict[str, Any], ...]
    finetune: dict[str, Any] | None


def progressive_prune(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: ProgressiveConfig = ProgressiveConfig(),
    *,
    workdir: str | None = None,
    progress: bool = True,
    choose: Chooser | None = None,
) -> PruneResult:
    """Simplifies a trained CNN layer by layer, retraining after each layer.

    Args:
      model: the model (`jaxprune.Model`: a linen or NNX module or any apply function, with
        its example input and call keywords). No rebuild is needed: after each layer the
        model runs as the pruned program of the original.
      variables: its trained variables.
      data: `PruneData` (or a `jaxprune.data.Dataset`, or an iterable of batches; see
        `methods.contract.as_prune_data`). Choices (the criterion, the stand-in's and the
        page's images, the evaluation after each layer) read ``data.validation()``;
        retraining reads ``data.train(epoch)``, layer l the epochs from l * retrain_epochs.
      config: criterion, p, retraining, BatchNorm policy, learning rates, final step.
      workdir: with one, the run checkpoints after every layer and resumes there; another
        run in the same workdir is refused, naming what changed.
      progress: a progress bar over the layers (and the final fine-tuning).
      choose: for the subjective criterion, who is asked for a layer the `selection` file
        does not cover: ``choose(LayerView) -> (indices, chosen_by)``, e.g.
        `progressive_choice.waiting_chooser` with the inspect layer's kernel page.

    Returns:
      A `PruneResult`: the pruned model (the pruned program), its variables, the kept
      channels of every simplified group of the original graph, one history record per layer
      and a summary (cost and validation before and after, the method's report).

    Raises:
      ValueError: an invalid config, layer list or data; `RunMismatchError`: the workdir holds
      another run; `SelectionError`: a selection that does not fit; `DivergenceError`:
      retraining diverged.
    """
    config.check()
    setup = _prepare(model, variables, data, config, choose, progress)
    identity = {
        "config": config_identity(config, _COSMETIC),
        "variables": setup.fingerprint,
        "data": fingerprint(setup.score_batches[:1]),
    }
    with RunDir.maybe(workdir, kind="progressive", identity=identity) as run:
        store = run.checkpoints(_LAYERS) if run is not None else None
        restored = _restore(setup, store) if store is not None else None
        network, state = restored or (setup.base, _State(0, {}, (), None))
        metrics = open_metrics(run, state.layers_done)
        with tqdm(
            total=len(setup.layers),
            initial=state.layers_done,
            unit="layer",
            desc=f"simplifying ({config.criterion}, {config.retraining})",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            while state.layers_done < len(setup.layers):
                network, state = _simplify_layer(setup, network, state)
                record = state.history[-1]
                # Logged before the checkpoint: a resume re-runs whatever the log may lack.
                if metrics is not None:
                    metrics.write(state.layers_done, "layer", **_layer_values(record))
                _save(store, network, state)
                # The ETA counts the work, not the time a person took to choose the kernels.
                exclude_from_eta(bar, record["time"].get("wait_s", 0.0))
                release_compiled_programs_if_crowded()
                if state.history[-1]["validation"] is not None:
                    accuracy = state.history[-1]["validation"]["accuracy"]
                    bar.set_postfix(acc=f"{100 * accuracy:.2f}%")
                bar.update(1)
        if config.final_finetune_epochs > 0 and state.finetune is None:
            network, finetune = _final_step(setup, network, run)
            state = dataclasses.replace(state, finetune=finetune)
            _save(store, network, state)
        summary = _summary(setup, network, state)
        write_result(metrics, len(setup.layers) + 1, summary)
        if run is not None:
            run.write_json("result.json", summary)
    keep = {name: np.asarray(kept, np.int64) for name, kept in state.keep.items()}
    return PruneResult(
        "progressive",
        network.model,
        jax.device_get(network.variables),
        keep,
        setup.base.graph,
        state.history,
        summary,
    )


def _prepare(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: ProgressiveConfig,
    choose: Chooser | None,
    progress: bool,
) -> _Setup:
    """Everything checked and read before the first layer: a bad input fails here."""
    if not isinstance(model, Model):
        raise TypeError(
            f"model must be a jaxprune.Model, got {type(model).__name__}; wrap a linen module "
            "with Model.linen(module, x, variables=variables)."
        )
    if config.criterion == "subjective" and not config.selection and choose is None:
        raise ValueError(
            "criterion='subjective' needs a person's choice: set ProgressiveConfig.selection "
            "to the file the kernel-selection page exported, or pass choose= (e.g. "
            "progressive_choice.waiting_chooser) to be asked layer by layer."
        )
    data = as_prune_data(data, seed=config.seed)
    variables = jax.tree.map(np.asarray, dict(variables))
    base = Network.of(model, variables)
    convs = select_groups(base.graph, "conv")
    layers = tuple(config.layers) if config.layers is not None else tuple(convs)
    for group in layers:
        base.graph[group]  # an unknown group fails here, naming the valid ones
    if len(set(layers)) != len(layers):
        raise ValueError(f"ProgressiveConfig.layers repeats a layer: {layers}.")
    order = list(base.graph.names)
    if [order.index(g) for g in layers] != sorted(order.index(g) for g in layers):
        raise ValueError(
            f"ProgressiveConfig.layers {layers} must follow the model's order {order}: the "
            "method goes from the first layer to the last."
        )
    if config.per_layer is not None and len(config.per_layer) != len(layers):
        raise ValueError(
            f"ProgressiveConfig.per_layer has {len(config.per_layer)} entries for the "
            f"{len(layers)} layers simplified ({', '.join(layers)}); give one per layer."
        )
    if config.criterion == "subjective" and config.selection:
        # A missing or malformed file, or one naming layers the model lacks, fails before any
        # work.
        chosen = selection_file.read_selection(config.selection)
        unknown = sorted(set(chosen) - set(order))
        if unknown:
            raise selection_file.SelectionError(
                f"The selection {config.selection} names layers this model does not have: "
                f"{unknown} (its layers: {order}). Was it made for another model?"
            )
    score_batches = tuple(
        retraining.rebatch(
            data.validation(),
            config.score_batch_size,
            config.score_examples,
            drop_remainder=False,
        )
    )
    if not score_batches:
        raise ValueError(
            "The validation data gives no image for the criterion; give validation data "
            "(data.validation() yields no batch)."
        )
    eval_batches = ()
    if config.eval_examples:
        eval_batches = tuple(
            retraining.rebatch(
                data.validation(),
                config.score_batch_size,
                config.eval_examples,
                drop_remainder=False,
            )
        )
    samples = next(retraining.rebatch(data.validation(), None, config.sample_images))
    return _Setup(
        config=config,
        model=model,
        base=base,
        data=data,
        layers=layers,
        score_batches=score_batches,
        eval_batches=eval_batches,
        sample_images=samples["image"],
        fingerprint=fingerprint(variables),
        choose=choose,
        progress=progress,
    )


def _network(setup: _Setup, keep: Mapping[str, Any], variables: PyTree) -> Network:
    """The model after the layers of `keep`: the original's pruned program."""
    if not keep:
        return Network(setup.model, variables, setup.base.graph)
    kept = {name: np.asarray(idx, np.int64) for name, idx in keep.items()}
    program = pruned_program(setup.base.graph, kept)
    return Network.of(setup.model.with_apply_fn(program), variables)


def _cost(network: Network) -> dict[str, float]:
    model = network.model
    report = cost.count(model.apply_fn, network.variables, model.example_input, **model.eval_kwargs)
    return {"flops": report.flops, "macs": report.macs, "params": report.params}


def _evaluate(setup: _Setup, network: Network) -> dict[str, float] | None:
    if not setup.eval_batches:
        return None
    return train.evaluate(network.model, network.variables, setup.eval_batches)


def _choose(
    setup: _Setup, network: Network, index: int
) -> tuple[np.ndarray, np.ndarray | None, str, dict[str, float] | None]:
    """(indices removed in the current width, all scores or None, who chose, reliability)."""
    config = setup.config
    group = setup.layers[index]
    size = network.graph[group].size
    count = removal_count(config, index, size)
    if config.criterion in HUMAN_CRITERIA:
        view = LayerView(
            group=group,
            index=index,
            count=count,
            model=network.model,
            variables=network.variables,
            graph=network.graph,
            images=setup.sample_images,
            batches=setup.score_batches,
            fingerprint=setup.fingerprint,
            accepted=tuple(sorted({setup.fingerprint, fingerprint(network.variables)})),
        )
        if config.criterion == "subjective":
            removed, chosen_by = choice.subjective_removals(view, config.selection, setup.choose)
        else:
            removed, chosen_by = choice.standin_removals(view)
        removed = np.sort(np.asarray(removed, np.int64))
        choice.check_whole_blocks(removed, network.graph[group].block, group)
        return removed, None, chosen_by, None
    # A seeded criterion ("random") draws anew for every layer.
    scoring = (network, group, setup.score_batches, config.criterion, config.criterion_options)
    reliability = None
    if config.reliability and criteria.get_criterion(config.criterion).uses_batches:
        scores, reliability = choice.score_layer_with_reliability(
            *scoring, seed=config.seed + index
        )
    else:
        scores = choice.score_layer(*scoring, seed=config.seed + index)
    removed = choice.lowest(scores, count, network.graph[group].block)
    return removed, scores, f"criterion:{config.criterion}", reliability


def _plan(setup: _Setup, student: Network, group: str, index: int) -> retraining.RetrainPlan:
    """The retraining after layer `index` (`group`) lost its kernels."""
    config = setup.config
    epochs = 0 if config.retraining == "none" else config.retrain_epochs
    common = dict(
        momentum=config.momentum,
        nesterov=config.nesterov,
        epochs=epochs,
        batch_norm=config.batch_norm,
    )
    per_layer = retraining.learning_rate_for(config.learning_rates, index)
    if config.retraining == "complete":
        rate = config.complete_learning_rate or per_layer
        return retraining.RetrainPlan(
            loss="cross_entropy",
            target_group=None,
            trainable=retraining.all_trainable(student.variables),
            learning_rate=rate,
            **common,
        )
    target = retraining.next_group(student.graph, group)
    return retraining.RetrainPlan(
        loss=config.loss,
        target_group=target,
        trainable=retraining.trainable_for(student, target),
        learning_rate=per_layer,
        **common,
    )


def _simplify_layer(setup: _Setup, network: Network, state: _State) -> tuple[Network, _State]:
    """Chooses, removes and retrains layer ``state.layers_done``."""
    config = setup.config
    index = state.layers_done
    group = setup.layers[index]
    began = time.perf_counter()
    size = network.graph[group].size
    removed, scores, chosen_by, reliability = _choose(setup, network, index)
    local = np.setdiff1d(np.arange(size), removed).astype(np.int64)
    chosen = time.perf_counter()
    keep = compose_keep({k: np.asarray(v) for k, v in state.keep.items()}, {group: local})
    pruned = prune(network.variables, network.graph, {group: local})
    student = _network(setup, keep, pruned.variables)
    plan = _plan(setup, student, group, index)
    epochs = config.retrain_epochs
    losses: dict[str, Any] = {"updates": 0, "epoch_loss": []}
    recalibrated: dict[str, Any] | None = None
    if epochs and (plan.epochs or config.batch_norm == "recalibrate"):
        data = retraining.epoch_data(
            setup.data, index * epochs, config.batch_size, config.retrain_examples
        )
        seed = config.seed + index
        variables = student.variables
        if plan.epochs:
            teacher = network if plan.loss == "mse" else None
            variables, losses = retraining.retrain(student, teacher, plan, data, seed=seed)
        if config.batch_norm == "recalibrate":
            moved = dataclasses.replace(student, variables=variables)
            variables, recalibrated = retraining.recalibrate(
                moved, plan.trainable, data, epochs, seed=seed
            )
        student = dataclasses.replace(student, variables=variables)
    retrained = time.perf_counter()
    base_size = setup.base.graph[group].size
    record = {
        "layer": index,
        "group": group,
        "chosen_by": chosen_by,
        "kernels_before": int(size),
        "kernels_after": int(local.size),
        "removed": [int(i) for i in removed],
        "removed_base": sorted(set(range(base_size)) - {int(i) for i in keep[group]}),
        "removed_scores": None if scores is None else [float(scores[i]) for i in removed],
        "reliability": reliability,
        "retraining": config.retraining,
        "target_group": plan.target_group,
        "learning_rate": plan.learning_rate if plan.epochs else None,
        "trainable_leaves": int(sum(jax.tree_util.tree_leaves(plan.trainable))),
        "batch_norm": config.batch_norm,
        "recalibration": recalibrated,
        "loss": losses,
        **_cost(student),
        "validation": _evaluate(setup, student),
        "time": {
            "choose_s": chosen - began,
            # A person choosing on the kernel page (the subjective criterion) is waited for.
            "wait_s": chosen - began if config.criterion == "subjective" else 0.0,
            "retrain_s": retrained - chosen,
            "eval_s": time.perf_counter() - retrained,
        },
    }
    state = _State(
        layers_done=index + 1,
        keep={k: [int(i) for i in v] for k, v in keep.items()},
        history=(*state.history, record),
        finetune=None,
    )
    return student, state


def _layer_values(record: Mapping[str, Any]) -> dict[str, float]:
    """One simplified layer's live metrics: kernels kept, the model's MACs and parameters,
    the validation loss and accuracy, and the retraining's last epoch loss."""
    values = {
        "kernels_after": record["kernels_after"],
        "removed": len(record["removed"]),
        "macs": record["macs"],
        "params": record["params"],
    }
    if record["validation"] is not None:
        values.update({k: record["validation"][k] for k in ("loss", "accuracy")})
    losses = (record.get("loss") or {}).get("epoch_loss") or []
    if losses:
        values["retrain_loss"] = float(losses[-1])
    return values


def exclude_from_eta(bar: tqdm, seconds: float) -> None:
    """Takes `seconds` (time spent waiting) out of a progress bar's elapsed time and rate."""
    if seconds > 0 and not bar.disable:
        bar.start_t += seconds
        bar.last_print_t += seconds


def _final_step(
    setup: _Setup, network: Network, run: RunDir | None
) -> tuple[Network, dict[str, Any]]:
    """Re-initialise the dense layers, fine-tune everything on the labels, evaluate."""
    config = setup.config
    began = time.perf_counter()
    data = retraining.epoch_data(
        setup.data,
        len(setup.layers) * config.retrain_epochs,
        config.final_batch_size,
        config.final_examples,
    )
    variables, record = final.final_finetune(
        network,
        data,
        epochs=config.final_finetune_epochs,
        learning_rate=config.final_learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        reinit=config.final_reinit,
        head_layer=config.head_layer,
        seed=config.seed,
        run=run,
        checkpoint_every=config.checkpoint_every,
        progress=setup.progress,
    )
    network = dataclasses.replace(network, variables=variables)
    record["validation"] = _evaluate(setup, network)
    record["time"] = {"finetune_s": time.perf_counter() - began}
    return network, record


def _save(store: Checkpoints | None, network: Network, state: _State) -> None:
    if store is None:
        return
    step = state.layers_done + (1 if state.finetune is not None else 0)
    meta = {
        "layers_done": state.layers_done,
        "keep": state.keep,
        "history": list(state.history),
        "finetune": state.finetune,
    }
    store.save(step, jax.device_get(network.variables), meta)


def _restore(setup: _Setup, store: Checkpoints) -> tuple[Network, _State] | None:
    step = store.latest_step()
    if step is None:
        return None
    # The meta first (its keep gives the shapes), then the arrays into those shapes.
    meta = _meta(store, step)
    keep = {name: np.asarray(v, np.int64) for name, v in meta["keep"].items()}
    target = jax.eval_shape(
        lambda v: prune(v, setup.base.graph, keep, verify=False).variables,
        setup.base.variables,
    )
    variables, meta = store.restore(step, target)
    state = _State(
        layers_done=int(meta["layers_done"]),
        keep={k: [int(i) for i in v] for k, v in meta["keep"].items()},
        history=tuple(meta["history"]),
        finetune=meta["finetune"],
    )
    return _network(setup, state.keep, variables), state


def _meta(store: Checkpoints, step: int) -> dict[str, Any]:
    """A checkpoint's meta alone (before its arrays' shapes are known)."""
    document = store.manager.restore(
        step, args=ckpt.ocp.args.Composite(meta=ckpt.ocp.args.JsonRestore())
    ).meta
    return dict(document["meta"])


def _summary(setup: _Setup, network: Network, state: _State) -> dict[str, Any]:
    """Cost and validation before and after, and the method's own report."""
    before, after = _cost(setup.base), _cost(network)
    totals: dict[str, float] = {}
    for record in (*state.history, state.finetune or {}):
        for key, value in record.get("time", {}).items():
            totals[key] = totals.get(key, 0.0) + value
    summary: dict[str, Any] = {
        "cost": {"before": before, "after": after},
        "remaining": {k: after[k] / before[k] if before[k] else 1.0 for k in before},
        "method": {
            "criterion": setup.config.criterion,
            "retraining": setup.config.retraining,
            "batch_norm": setup.config.batch_norm,
            "layers": len(state.history),
            "kernels": {
                g: {"before": setup.base.graph[g].size, "after": len(state.keep.get(g, []))}
                for g in setup.layers
                if g in state.keep
            },
            "finetune": state.finetune,
            "time": totals,
        },
    }
    if setup.eval_batches:
        summary["validation"] = {
            "before": _evaluate(setup, setup.base),
            "after": _evaluate(setup, network),
        }
    return summary
