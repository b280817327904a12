"""Layer-by-layer kernel elimination with progressive retraining (Osaku et al., PRL 2021).

"Convolutional Neural Network Simplification with Progressive Retraining" (arXiv 2101.04699)
simplifies a trained CNN one convolutional layer at a time, from the first to the last. For
layer l:

1. score its kernels: the *objective* criterion is the loss over training images with each
   kernel removed alone (the registered criterion "oracle_loss", all kernels of the layer in
   one compiled call); the kernels whose removal leaves the lowest loss go. Any registered
   criterion can stand in (the paper's baselines are "l1" and "apoz"). The *subjective*
   criterion is a person's choice from the kernel-selection page ("subjective"), replayed from
   a selection file or asked for layer by layer; "standin" is a scripted rule that imitates
   that choice (near-empty or duplicate activation maps) and is labelled as such;
2. remove p of them: a fraction (default 0.05), a count, or one value per layer;
3. physically shrink the model (`surgery.prune`) and retrain: *progressive* retraining trains
   layers 1..l+1 only, to reproduce the output of layer l+1 of the model before layer l was
   pruned (MSE, as the authors' code; cross-entropy as an option), SGD with Nesterov momentum
   0.9 and a learning rate per layer; *complete* retraining (the paper's ablation) trains
   everything on the cross-entropy; "none" skips it.

An optional final step re-initialises the dense head and fine-tunes the whole network. Every
layer is checkpointed in the workdir; a killed run resumes and ends bit-identical to an
uninterrupted one (each layer's data order and dropout keys are functions of the seed and the
layer index only).

What the paper leaves open, and what jaxprune does (each a `ProgressiveConfig` field):

- how a fraction p becomes a count: rounded to the nearest integer, and no layer keeps fewer
  than `min_channels` kernels (`removal_count`);
- how many training images the criterion reads: `score_examples` (the paper's objective
  criterion reads the whole training set; the default reads 512);
- BatchNorm during retraining: `train_mode` (default True: batch statistics, running averages
  of the trained layers follow the data; the teacher's target is always in evaluation mode);
- layer l+1 of the last convolution: the first dense layer after it (its activation is the
  target); with no later group, the logits;
- complete retraining uses the same per-layer learning rate, batch size and epochs as
  progressive retraining; the final fine-tuning has its own (`final_*`) settings, and the
  re-initialised head is drawn LeCun-normal with a zero bias.

Example:
  >>> from jaxprune import checkpoint, data
  >>> from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune
  >>> model, variables, _ = checkpoint.load_model_file("vgg_small_fashion_mnist.msgpack")
  >>> dataset = data.load(data.DataConfig())
  >>> config = ProgressiveConfig(criterion="oracle_loss", ratio=0.25, retrain_examples=2048)
  >>> result = progressive_prune(config, "vgg_small", variables, dataset, workdir="runs/osaku")
  >>> result.widths  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxprune import checkpoint as ckpt
from jaxprune import cost, criteria, train
from jaxprune import data as data_lib
from jaxprune.graph import channel_graph
from jaxprune.methods import progressive_retrain as retraining
from jaxprune.methods.iterative import evaluate_split
from jaxprune.methods.oneshot import select_groups
from jaxprune.model import Model
from jaxprune.models import Rebuild, rebuild_fn, widths_from_params
from jaxprune.surgery import compose_keep, prune

PyTree = Any
ApplyFn = Callable[..., Any]

# Kernel choices that are not registered criteria.
HUMAN_CRITERIA = ("subjective", "standin")
RETRAINING = ("progressive", "complete", "none")
LOSSES = ("mse", "cross_entropy")
# The authors' learning rates (oPPR): 1e-5 for layer 1, 1e-6 for layers 2-3, 1e-7 for 4-6,
# 1e-8 after; as (first 0-based layer index, rate) breakpoints.
PAPER_LEARNING_RATES = ((0, 1e-5), (1, 1e-6), (3, 1e-7), (6, 1e-8))
# Config fields that do not change a run's result: a resumed run may change them.
_COSMETIC_FIELDS = ("progress", "poll_seconds", "selection_timeout_s", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig:
    """One progressive-retraining run (JSON-serialisable with `to_dict`)."""

    # How kernels are chosen: a registered criterion ("oracle_loss", the paper's objective
    # criterion; "l1", "apoz", "taylor", ...), "subjective" (a person's selection file, or the
    # page asked for layer by layer) or "standin" (a scripted rule in place of the person).
    criterion: str = "oracle_loss"
    # Keyword options of a registered criterion, e.g. {"mode": "mask"} for the oracle.
    criterion_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # p: the fraction of each layer's kernels removed (rounded; the paper's 5%).
    ratio: float = 0.05
    # p as a count of kernels per layer instead; overrides `ratio` when set.
    count: int | None = None
    # p per simplified layer, in order: an int is a count, a float a fraction. Overrides both.
    per_layer: tuple[float | int, ...] | None = None
    # The groups simplified, first to last; None: every convolution group in model order.
    layers: tuple[str, ...] | None = None
    # No layer keeps fewer kernels than this.
    min_channels: int = 1
    # Training images the criterion reads (the paper: the whole training set).
    score_examples: int = 512
    # Batch size of scoring and of evaluation.
    score_batch_size: int = 128
    # "progressive" (layers 1..l+1), "complete" (every layer, cross-entropy) or "none".
    retraining: str = "progressive"
    # Loss of progressive retraining: "mse" (layer l+1's output vs. the model before pruning
    # layer l, the authors' code) or "cross_entropy" (the labels, through the frozen rest).
    loss: str = "mse"
    # Learning rate per simplified layer as (first 0-based layer index, rate) breakpoints.
    learning_rates: tuple[tuple[int, float], ...] = PAPER_LEARNING_RATES
    # SGD momentum and Nesterov (the paper: Nesterov, 0.9).
    momentum: float = 0.9
    nesterov: bool = True
    # Retraining batch size (the paper: 8) and epochs per layer (the paper: 1).
    batch_size: int = 8
    retrain_epochs: int = 1
    # Training images per retraining epoch (the first of each layer's shuffle); None: all.
    retrain_examples: int | None = None
    # Retrain in training mode (BatchNorm batch statistics, dropout); False: evaluation mode.
    train_mode: bool = True
    # Epochs of the optional final fine-tuning of the whole network (cross-entropy); 0: none.
    final_finetune_epochs: int = 0
    # Its learning rate, batch size and training images per epoch (None: all).
    final_learning_rate: float = 1e-3
    final_batch_size: int = 64
    final_examples: int | None = None
    # Re-initialise the dense head (`head_layer`) before the final fine-tuning.
    reinit_head: bool = False
    # The params path of the dense head, e.g. "head" or "classifier/out".
    head_layer: str = "head"
    # Subjective criterion: a selection file or directory (`jaxprune.inspect.selection`).
    selection: str = ""
    # Subjective criterion: when a layer has no selection, write its page into
    # workdir/selection/<group>.html and wait for workdir/selection/<group>.json.
    wait_for_selection: bool = False
    # Seconds between two looks for that file, and how long to wait (None: forever).
    poll_seconds: float = 1.0
    selection_timeout_s: float | None = None
    # Images the page and the stand-in show per kernel (the first training images).
    sample_images: int = 16
    # Validation images evaluated after every layer (the first ones); 0: no evaluation.
    eval_examples: int = 1000
    # How many of the latest checkpoints the workdir keeps.
    keep_checkpoints: int = 2
    # Seed of the data order, dropout, random criteria and the head re-initialisation.
    seed: int = 0
    # Show a progress bar over the layers on stderr.
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible nested dicts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Result:
    """What `progressive_prune` returns.

    Attributes:
      variables: the physically pruned (and retrained) variables.
      widths: their width spec, to rebuild a zoo model.
      keep: per simplified group, the indices of the base model's kernels that survive.
      history: one record per layer: kernels before and after, the base indices removed, the
        scores of the removed kernels, the learning rate and retraining losses, FLOPs / MACs /
        parameters after the layer, validation metrics, timings.
      summary: base and final cost, the final fine-tuning's record, total timings.
    """

    variables: PyTree
    widths: dict[str, int]
    keep: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def check_config(config: ProgressiveConfig) -> None:
    """Checks the fields of a `ProgressiveConfig` that need no model or data.

    Args:
      config: the run.

    Raises:
      ValueError: naming the first invalid field and what it accepts.
    """
    if config.criterion not in criteria.CRITERIA and config.criterion not in HUMAN_CRITERIA:
        raise ValueError(
            f"ProgressiveConfig.criterion={config.criterion!r} is neither a registered criterion "
            f"({', '.join(sorted(criteria.CRITERIA))}) nor one of {HUMAN_CRITERIA}."
        )
    if config.retraining not in RETRAINING:
        raise ValueError(
            f"ProgressiveConfig.retraining={config.retraining!r}; choose one of {RETRAINING}."
        )
    if config.loss not in LOSSES:
        raise ValueError(f"ProgressiveConfig.loss={config.loss!r}; choose one of {LOSSES}.")
    if not 0.0 <= config.ratio < 1.0:
        raise ValueError(
            f"ProgressiveConfig.ratio={config.ratio} must lie in [0, 1): it is the fraction of "
            "each layer's kernels removed."
        )
    if config.count is not None and config.count < 0:
        raise ValueError(f"ProgressiveConfig.count must be >= 0, got {config.count}.")
    for value in config.per_layer or ():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"ProgressiveConfig.per_layer holds {value!r}; write each layer's p as an int "
                "(a count) or a float (a fraction)."
            )
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(
                f"ProgressiveConfig.per_layer holds the fraction {value}; fractions lie in "
                "[0, 1) (write counts as ints)."
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"ProgressiveConfig.per_layer holds the count {value}; use >= 0.")
    positive = ("min_channels", "score_examples", "score_batch_size", "batch_size")
    positive += ("final_batch_size", "sample_images", "keep_checkpoints")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"ProgressiveConfig.{name} must be >= 1, got {getattr(config, name)}.")
    for name in ("retrain_epochs", "final_finetune_epochs", "eval_examples", "seed"):
        if getattr(config, name) < 0:
            raise ValueError(f"ProgressiveConfig.{name} must be >= 0, got {getattr(config, name)}.")
    for name in ("retrain_epochs", "final_finetune_epochs"):
        # Each layer's data order is numbered layer * 1000 + epoch (`progressive_retrain`).
        if getattr(config, name) >= retraining.EPOCHS_PER_STREAM:
            raise ValueError(
                f"ProgressiveConfig.{name} must be < {retraining.EPOCHS_PER_STREAM}, got "
                f"{getattr(config, name)}."
            )
    for name in ("retrain_examples", "final_examples"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"ProgressiveConfig.{name} must be >= 1 or None, got {value}.")
    if not config.learning_rates or min(first for first, _ in config.learning_rates) != 0:
        raise ValueError(
            f"ProgressiveConfig.learning_rates={config.learning_rates} must be (first layer "
            "index, rate) pairs starting at layer 0, e.g. ((0, 1e-5), (1, 1e-6))."
        )
    if any(not rate > 0 for _, rate in config.learning_rates) or not (
        config.final_learning_rate > 0
    ):
        raise ValueError("ProgressiveConfig learning rates must be > 0.")
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"ProgressiveConfig.momentum must lie in [0, 1), got {config.momentum}.")
    if config.criterion == "subjective" and not (config.selection or config.wait_for_selection):
        raise ValueError(
            "criterion='subjective' needs a selection: set ProgressiveConfig.selection to the "
            "file the kernel-selection page exported, or wait_for_selection=True to be asked "
            "layer by layer."
        )


# ---------------------------------------------------------------------------------------------
# Choosing the kernels of one layer (pure functions)
# ---------------------------------------------------------------------------------------------


def removal_count(config: ProgressiveConfig, layer_index: int, size: int) -> int:
    """How many kernels layer `layer_index` (0-based, of `size` kernels) loses.

    Args:
      config: the run (`per_layer`, `count`, `ratio`, `min_channels`).
      layer_index: the position of the layer among the simplified ones.
      size: its current number of kernels.

    Returns:
      p as a count: `per_layer`, else `count`, else ``round(ratio * size)``, never leaving
      fewer than `min_channels` kernels.

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
    wanted = int(value) if isinstance(value, int) else int(round(float(value) * size))
    return max(0, min(wanted, size - config.min_channels))


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """The indices of the `count` lowest scores, sorted; ties go to the lower index.

    Args:
      scores: one score per kernel (higher = more relevant).
      count: how many to take.

    Returns:
      Sorted int64 indices of the least relevant kernels.

    Raises:
      ValueError: NaN scores.
    """
    values = np.asarray(scores, np.float64)
    if np.isnan(values).any():
        raise ValueError("The kernel scores contain NaN; check the criterion and the data.")
    return np.sort(np.argsort(values, kind="stable")[:count]).astype(np.int64)


def score_layer(
    config: ProgressiveConfig,
    network: retraining.Network,
    group: str,
    batches: Sequence[Mapping[str, Any]],
    layer_index: int,
) -> np.ndarray:
    """One score per kernel of `group` by a registered criterion (higher = more relevant).

    Criteria that can be restricted to one group (the oracles) score only that group.

    Args:
      config: the run (`criterion`, `criterion_options`, `seed`).
      network: the model as it is before this layer is simplified.
      group: the layer scored.
      batches: preprocessed training batches the criterion reads.
      layer_index: the layer's position among the simplified ones (reseeds random criteria).

    Returns:
      The scores, shape (kernels of `group`,).

    Raises:
      ValueError: the criterion gives no scores for `group`.
    """
    options = dict(config.criterion_options)
    constructor = criteria.CRITERIA[config.criterion]
    accepted = inspect.signature(constructor).parameters
    if "groups" in accepted:
        options.setdefault("groups", (group,))
    if "seed" in accepted:
        # A seeded criterion ("random") draws anew for every layer.
        options["seed"] = int(options.get("seed", config.seed)) + layer_index
    context = criteria.ScoringContext(apply_fn=network.apply_fn, graph=network.graph)
    scores = criteria.score(config.criterion, context, network.variables, batches, **options)
    if group not in scores:
        raise ValueError(
            f"Criterion {config.criterion!r} gives no scores for layer {group!r}; choose a "
            "criterion that applies to convolutions."
        )
    return scores[group]


def _wait_for_file(paths: Sequence[Path], config: ProgressiveConfig) -> Path:
    """Waits until one of `paths` holds a whole file; returns it (the first listed wins).

    A browser may create the file before it has written it: an empty file, or one that is not
    JSON yet and was changed in the last few seconds, is not taken.
    """
    began = time.monotonic()
    while True:
        for path in paths:
            if _complete(path):
                return path
        if (
            config.selection_timeout_s is not None
            and time.monotonic() - began > config.selection_timeout_s
        ):
            raise TimeoutError(
                f"No selection {' or '.join(str(p) for p in paths)} after "
                f"{config.selection_timeout_s} s; export it from the page next to it, or raise "
                "ProgressiveConfig.selection_timeout_s."
            )
        time.sleep(config.poll_seconds)


def _complete(path: Path) -> bool:
    try:
        stat = path.stat()
        if not path.is_file() or stat.st_size == 0:
            return False
        json.loads(path.read_text())
        return True
    except FileNotFoundError:
        return False
    except (ValueError, UnicodeDecodeError):
        # Still being written, or broken: reading it says so once it has stopped changing.
        return time.time() - stat.st_mtime > 5.0


def subjective_removals(
    config: ProgressiveConfig,
    network: retraining.Network,
    group: str,
    images: jax.Array,
    batches: Sequence[Mapping[str, Any]],
    workdir: Path | None,
    *,
    model_fingerprint: str | None = None,
    suggested: int | None = None,
) -> tuple[np.ndarray, str]:
    """A person's choice for `group`: from the selection file, or asked through the page.

    The page is ``workdir/selection/<layer>.html``; the answer is read from
    ``workdir/selection/<layer>.json`` or, failing that, ``selection_<layer>.json`` in the same
    folder (the name the page's download gets).

    Args:
      config: the run (`selection`, `wait_for_selection`, polling and timeout).
      network: the model as it is before this layer is simplified.
      group: the layer chosen for.
      images: the sample images the page shows.
      batches: training batches for the objective score the page shows next to each kernel.
      workdir: where the page is written and the answer awaited (``workdir/selection``).
      model_fingerprint: the run's base model's fingerprint, recorded by the page; a selection
        is accepted when it records this or the current network's fingerprint (or none).
        None: the current network's only.
      suggested: the count p means for this layer, shown on the page.

    Returns:
      (indices to remove in the layer's current width, who chose: "person" or "stand-in:...").

    Raises:
      SelectionError: the selection was made on another model or does not fit the layer;
        TimeoutError: nobody answered.
    """
    from jaxprune.inspect import selection as selection_lib

    sizes = {group: network.graph[group].size}
    current = selection_lib.model_fingerprint(network.variables)
    accepted = {current} | ({model_fingerprint} if model_fingerprint else set())
    if config.selection:
        layers = selection_lib.read_selection(config.selection)
        if group in layers:
            selection_lib.check_against({group: layers[group]}, sizes, fingerprints=accepted)
            return layers[group]["remove"], layers[group]["chosen_by"]
    if not config.wait_for_selection:
        raise selection_lib.SelectionError(
            f"The selection {config.selection or '(none)'} has no choice for layer {group!r}; "
            "add it with the page of `jaxprune inspect`, or set wait_for_selection=True to be "
            "asked for each layer."
        )
    if workdir is None:
        raise ValueError("wait_for_selection needs a workdir (the page and the answer go there).")
    from jaxprune.inspect.macs import macs_per_kernel
    from jaxprune.inspect.page import (
        PageConfig,
        page_file_name,
        selection_file_names,
        write_kernel_page,
    )

    folder = (Path(workdir) / "selection").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / page_file_name(group)
    answers = [folder / name for name in selection_file_names(group)]
    answer = next((path for path in answers if _complete(path)), None)
    if answer is None:
        # The page shows each kernel's objective score next to its maps.
        objective = criteria.score(
            "oracle_loss",
            criteria.ScoringContext(apply_fn=network.apply_fn, graph=network.graph),
            network.variables,
            batches,
            groups=(group,),
        )[group]
        example = jnp.zeros((1, *images.shape[1:]), jnp.float32)
        write_kernel_page(
            page,
            network.apply_fn,
            network.variables,
            network.graph,
            group,
            images,
            scores=objective,
            macs_per_kernel=macs_per_kernel(
                network.apply_fn, network.variables, network.graph, group, example
            ),
            title=f"layer {group}: choose kernels to remove",
            config=PageConfig(
                save_to=str(answers[0]),
                count=suggested,
                model_fingerprint=model_fingerprint or current,
            ),
        )
        print(
            f"Choose the kernels of layer {group!r} on {page}; waiting for {answers[0]} "
            f"(or {answers[1].name} in that folder)",
            flush=True,
        )
        answer = _wait_for_file(answers, config)
    layers = selection_lib.read_selection(answer)
    if group not in layers:
        raise selection_lib.SelectionError(f"{answer} holds no choice for layer {group!r}.")
    selection_lib.check_against({group: layers[group]}, sizes, fingerprints=accepted)
    return layers[group]["remove"], layers[group]["chosen_by"]


def choose_kernels(
    config: ProgressiveConfig,
    network: retraining.Network,
    group: str,
    layer_index: int,
    batches: Sequence[Mapping[str, Any]],
    images: jax.Array,
    workdir: Path | None,
    *,
    model_fingerprint: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The kernels of `group` to remove, their scores (when a criterion gave any) and who chose.

    Args:
      config: the run.
      network: the model as it is before this layer is simplified.
      group: the layer.
      layer_index: its position among the simplified layers.
      batches: preprocessed training batches for the criterion.
      images: sample images for the page and the stand-in.
      workdir: the run's workdir (the interactive page), or None.
      model_fingerprint: the base model's fingerprint, which a selection may record.

    Returns:
      (sorted indices in the layer's current width, scores of all its kernels or None,
      "criterion:<name>", "person" or "stand-in:<rule>").

    Raises:
      ValueError, SelectionError, TimeoutError: from the criterion or the selection.
    """
    size = network.graph[group].size
    if config.criterion == "subjective":
        removed, chosen_by = subjective_removals(
            config,
            network,
            group,
            images,
            batches,
            workdir,
            model_fingerprint=model_fingerprint,
            suggested=removal_count(config, layer_index, size),
        )
        return np.sort(np.asarray(removed, np.int64)), None, chosen_by
    count = removal_count(config, layer_index, size)
    if config.criterion == "standin":
        from jaxprune.inspect.standin import CHOSEN_BY, standin_removals

        removed = standin_removals(
            network.apply_fn, network.variables, network.graph, group, images, count
        )
        removed = np.sort(np.asarray(removed, np.int64))
        if removed.size >= size or len(np.unique(removed)) != removed.size:
            raise ValueError(f"The stand-in chose an invalid set {removed.tolist()} of {group!r}.")
        return removed, None, CHOSEN_BY
    scores = score_layer(config, network, group, batches, layer_index)
    return lowest(scores, count), np.asarray(scores, np.float64), f"criterion:{config.criterion}"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Setup:
    config: ProgressiveConfig
    rebuild: Rebuild
    base: retraining.Network
    dataset: Any
    layers: tuple[str, ...]
    example_input: jax.Array
    score_batches: tuple[dict[str, jax.Array], ...]
    sample_images: jax.Array
    fingerprint: str
    base_cost: cost.CostReport


def make_network(
    rebuild: Rebuild, variables: PyTree, example_input: jax.Array
) -> retraining.Network:
    """The network of `variables`: its rebuilt apply function and its channel graph.

    Args:
      rebuild: maps a width spec to the apply function of the model with those widths.
      variables: the model's variables (their shapes give the widths).
      example_input: one input batch to trace the model with.

    Returns:
      The `Network` (apply function, variables, channel graph).
    """
    apply_fn = rebuild(widths_from_params(variables["params"]))
    graph = channel_graph(apply_fn, variables, example_input)
    return retraining.Network(apply_fn, variables, graph)


def _prepare(config: ProgressiveConfig, model: str | Rebuild, variables: PyTree, dataset: Any):
    check_config(config)
    rebuild = rebuild_fn(model, dataset.num_classes)
    example = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    variables = jax.tree.map(jnp.asarray, dict(variables))
    base = make_network(rebuild, variables, example)
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
        from jaxprune.inspect.selection import read_selection

        read_selection(config.selection)  # a missing or malformed file fails before any work
    batches = tuple(
        data_lib.preprocessed_batches(
            dataset,
            "train",
            config.score_batch_size,
            min(config.score_examples, dataset.num_examples["train"]),
        )
    )
    sample_count = min(config.sample_images, dataset.num_examples["train"])
    samples = next(data_lib.preprocessed_batches(dataset, "train", sample_count, sample_count))[
        "image"
    ]
    return _Setup(
        config=config,
        rebuild=rebuild,
        base=base,
        dataset=dataset,
        layers=layers,
        example_input=example,
        score_batches=batches,
        sample_images=samples,
        fingerprint=ckpt.tree_fingerprint(variables),
        base_cost=cost.count(base.apply_fn, variables, example, train=False),
    )


def _cost_of(network: retraining.Network, example: jax.Array) -> dict[str, float]:
    report = cost.count(network.apply_fn, network.variables, example, train=False)
    return {"flops": report.flops, "macs": report.macs, "params": report.params}


def _evaluate(setup: _Setup, network: retraining.Network, split: str, limit: int | None):
    model = Model.from_apply(network.apply_fn, setup.example_input, train_flag="train")
    return evaluate_split(
        model,
        network.variables,
        setup.dataset,
        split,
        batch_size=setup.config.score_batch_size,
        limit=limit,
        mesh=train.make_mesh(),
    )


def _plan(setup: _Setup, student: retraining.Network, group: str, index: int):
    """The retraining plan after layer `index` (`group`) lost its kernels; None: no retraining."""
    config = setup.config
    if config.retraining == "none" or config.retrain_epochs == 0:
        return None
    target = retraining.next_group(student.graph, group)
    common = dict(
        learning_rate=retraining.learning_rate_for(config.learning_rates, index),
        momentum=config.momentum,
        nesterov=config.nesterov,
        batch_size=config.batch_size,
        epochs=config.retrain_epochs,
        examples=config.retrain_examples,
        train_mode=config.train_mode,
        seed=config.seed,
        stream=index,
    )
    if config.retraining == "complete":
        trainable = retraining.all_trainable(student.variables)
        return retraining.RetrainPlan(
            loss="cross_entropy", target_group=None, trainable=trainable, **common
        )
    trainable = retraining.trainable_for(student, target, setup.example_input)
    return retraining.RetrainPlan(
        loss=config.loss, target_group=target, trainable=trainable, **common
    )


def _simplify_layer(
    setup: _Setup, network: retraining.Network, index: int, workdir: Path | None
) -> tuple[retraining.Network, dict[str, np.ndarray], dict[str, Any]]:
    """Scores, removes and retrains layer `index`; returns the new network, keep and record."""
    config = setup.config
    group = setup.layers[index]
    began = time.perf_counter()
    removed, scores, chosen_by = choose_kernels(
        config,
        network,
        group,
        index,
        setup.score_batches,
        setup.sample_images,
        workdir,
        model_fingerprint=setup.fingerprint,
    )
    size = network.graph[group].size
    keep = np.setdiff1d(np.arange(size), removed).astype(np.int64)
    scored = time.perf_counter()
    pruned = prune(network.variables, network.graph, {group: keep})
    student = make_network(setup.rebuild, pruned.variables, setup.example_input)
    plan = _plan(setup, student, group, index)
    losses: dict[str, Any] = {"updates": 0}
    if plan is not None:
        teacher = network if plan.loss == "mse" else None
        variables, losses = retraining.retrain(student, teacher, plan, setup.dataset)
        student = dataclasses.replace(student, variables=variables)
    retrained = time.perf_counter()
    validation = None
    if config.eval_examples:
        limit = min(config.eval_examples, setup.dataset.num_examples["validation"])
        validation = _evaluate(setup, student, "validation", limit)
    record = {
        "layer": index,
        "group": group,
        "chosen_by": chosen_by,
        "kernels_before": int(size),
        "kernels_after": int(keep.size),
        "removed": [int(i) for i in removed],
        "removed_scores": None if scores is None else [float(scores[i]) for i in removed],
        "retraining": config.retraining,
        "target_group": None if plan is None else plan.target_group,
        "learning_rate": None if plan is None else plan.learning_rate,
        "trainable_leaves": None
        if plan is None
        else int(sum(jax.tree_util.tree_leaves(plan.trainable))),
        "loss": losses,
        **_cost_of(student, setup.example_input),
        "validation": validation,
        "time": {
            "choose_s": scored - began,
            "retrain_s": retrained - scored,
            "eval_s": time.perf_counter() - retrained,
        },
    }
    return student, {group: keep}, record


def reinit_head(variables: PyTree, head_layer: str, seed: int) -> PyTree:
    """The variables with the dense head's kernel re-drawn (LeCun normal) and its bias zeroed.

    Args:
      variables: the model's variables.
      head_layer: the params path of the dense head, "/"-separated (e.g. "head").
      seed: seed of the new kernel.

    Returns:
      New variables; every other leaf is the same object as before.

    Raises:
      ValueError: no dense layer at `head_layer`.
    """
    params = dict(variables["params"])
    path = head_layer.split("/")
    node: Any = params
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, Mapping) else None
    leaf = node.get(path[-1]) if isinstance(node, Mapping) else None
    if not isinstance(leaf, Mapping) or "kernel" not in leaf or np.ndim(leaf["kernel"]) != 2:
        raise ValueError(
            f"No dense layer {head_layer!r} in the params (top level: {sorted(params)}); set "
            "ProgressiveConfig.head_layer to the path of the logits layer."
        )
    kernel = jax.nn.initializers.lecun_normal()(
        jax.random.key(seed), leaf["kernel"].shape, leaf["kernel"].dtype
    )
    fresh = {**leaf, "kernel": kernel}
    if "bias" in leaf:
        fresh["bias"] = jnp.zeros_like(leaf["bias"])

    def replace(tree: Mapping[str, Any], parts: list[str]) -> dict[str, Any]:
        if len(parts) == 1:
            return {**tree, parts[0]: fresh}
        return {**tree, parts[0]: replace(tree[parts[0]], parts[1:])}

    return {**variables, "params": replace(params, path)}


def _final_finetune(setup: _Setup, network: retraining.Network) -> tuple[retraining.Network, dict]:
    """The optional last step: re-initialise the head, fine-tune everything on the labels."""
    config = setup.config
    began = time.perf_counter()
    variables = network.variables
    if config.reinit_head:
        variables = reinit_head(variables, config.head_layer, config.seed)
    network = dataclasses.replace(network, variables=variables)
    plan = retraining.RetrainPlan(
        loss="cross_entropy",
        target_group=None,
        trainable=retraining.all_trainable(variables),
        learning_rate=config.final_learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        batch_size=config.final_batch_size,
        epochs=config.final_finetune_epochs,
        examples=config.final_examples,
        train_mode=config.train_mode,
        seed=config.seed,
        stream=len(setup.layers),
    )
    variables, losses = retraining.retrain(network, None, plan, setup.dataset)
    network = dataclasses.replace(network, variables=variables)
    validation = None
    if config.eval_examples:
        limit = min(config.eval_examples, setup.dataset.num_examples["validation"])
        validation = _evaluate(setup, network, "validation", limit)
    return network, {
        "reinit_head": config.reinit_head,
        "epochs": config.final_finetune_epochs,
        "loss": losses,
        "validation": validation,
        "time": {"finetune_s": time.perf_counter() - began},
    }


@dataclasses.dataclass(frozen=True)
class _Progress:
    layers_done: int
    base_keep: dict[str, list[int]]
    history: tuple[dict[str, Any], ...]
    finetune: dict[str, Any] | None


def _save(setup: _Setup, manager: Any, network: retraining.Network, progress: _Progress) -> None:
    if manager is None:
        return
    step = progress.layers_done + (1 if progress.finetune is not None else 0)
    meta = {
        "format": "jaxprune-progressive/1",
        "config": setup.config.to_dict(),
        "base_fingerprint": setup.fingerprint,
        "layers_done": progress.layers_done,
        "base_keep": progress.base_keep,
        "history": list(progress.history),
        "finetune": progress.finetune,
    }
    meta = json.loads(json.dumps(meta, default=ckpt.json_default))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(network.variables)),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.wait_until_finished()


def _restore(setup: _Setup, manager: Any) -> tuple[retraining.Network, _Progress] | None:
    step = manager.latest_step()
    if step is None:
        return None
    where = Path(manager.directory) / str(step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    ckpt.check_same_run(
        where,
        stored_fingerprint=meta.get("base_fingerprint"),
        fingerprint=setup.fingerprint,
        stored_config=meta["config"],
        config=setup.config.to_dict(),
        config_name="ProgressiveConfig",
        ignore=_COSMETIC_FIELDS,
    )
    keep = {name: np.asarray(v, np.int64) for name, v in meta["base_keep"].items()}
    abstract = jax.eval_shape(
        lambda v: prune(v, setup.base.graph, keep).variables, setup.base.variables
    )
    variables = ckpt.restore_state(manager, step, abstract, where=str(where))
    network = make_network(setup.rebuild, variables, setup.example_input)
    progress = _Progress(
        layers_done=int(meta["layers_done"]),
        base_keep={k: list(v) for k, v in meta["base_keep"].items()},
        history=tuple(meta["history"]),
        finetune=meta["finetune"],
    )
    return network, progress


def progressive_prune(
    config: ProgressiveConfig,
    model: str | Rebuild,
    variables: PyTree,
    dataset: Any,
    *,
    workdir: str | Path | None = None,
) -> Result:
    """Simplifies a trained CNN layer by layer, retraining after each layer.

    Args:
      config: the run (criterion, p, retraining, learning rates, final step, ...).
      model: a zoo model name (rebuilt with ``build_model(name, dataset.num_classes, widths)``
        after every layer), or for your own model a callable ``rebuild(widths) -> apply_fn``
        returning the apply function of the model with those widths.
      variables: the trained model's variables (``{"params", "batch_stats"}``).
      dataset: a `jaxprune.data.Dataset` (or an object with its ``iterate``, ``num_batches``,
        ``num_examples``, ``preprocess``, ``num_classes`` and ``image_shape``). Scoring and
        retraining read "train" (as the paper), evaluation after each layer "validation".
      workdir: if given, every layer is checkpointed in ``workdir/checkpoints`` and a rerun
        resumes after the last finished layer; the interactive page goes to
        ``workdir/selection``.

    Returns:
      The pruned variables, widths, kept base kernels, per-layer history and summary.

    Raises:
      ValueError: an invalid config or model; CheckpointError: the workdir belongs to another
      run; SelectionError: a selection that does not fit; FloatingPointError: retraining
      diverged.
    """
    setup = _prepare(config, model, variables, dataset)
    manager = None
    if workdir is not None:
        workdir = Path(workdir)
        manager = ckpt.open_checkpoints(
            workdir / "checkpoints", max_to_keep=config.keep_checkpoints, cleanup_tmp=True
        )
    try:
        restored = _restore(setup, manager) if manager is not None else None
        network, progress = restored or (setup.base, _Progress(0, {}, (), None))
        with tqdm(
            total=len(setup.layers),
            initial=progress.layers_done,
            unit="layer",
            desc=f"simplifying ({config.criterion}, {config.retraining})",
            disable=not config.progress,
            dynamic_ncols=True,
        ) as bar:
            while progress.layers_done < len(setup.layers):
                network, keep, record = _simplify_layer(
                    setup, network, progress.layers_done, workdir
                )
                base_keep = compose_keep(
                    {k: np.asarray(v) for k, v in progress.base_keep.items()}, keep
                )
                group = setup.layers[progress.layers_done]
                record["removed_base"] = sorted(
                    set(range(setup.base.graph[group].size)) - set(base_keep[group].tolist())
                )
                progress = _Progress(
                    layers_done=progress.layers_done + 1,
                    base_keep={k: [int(i) for i in v] for k, v in base_keep.items()},
                    history=(*progress.history, record),
                    finetune=None,
                )
                _save(setup, manager, network, progress)
                if record["validation"] is not None:
                    bar.set_postfix(acc=f"{100 * record['validation']['accuracy']:.2f}%")
                bar.update(1)
        if config.final_finetune_epochs > 0 and progress.finetune is None:
            network, finetune = _final_finetune(setup, network)
            progress = dataclasses.replace(progress, finetune=finetune)
            _save(setup, manager, network, progress)
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    plain = jax.device_get(network.variables)
    final = _cost_of(network, setup.example_input)
    base = setup.base_cost
    totals: dict[str, float] = {}
    for record in progress.history:
        for key, value in record["time"].items():
            totals[key] = totals.get(key, 0.0) + value
    summary = {
        "criterion": config.criterion,
        "retraining": config.retraining,
        "layers": len(progress.history),
        "base": {"flops": base.flops, "macs": base.macs, "params": base.params},
        "final": {
            **final,
            "remaining": {
                "flops": final["flops"] / base.flops,
                "macs": final["macs"] / base.macs,
                "params": final["params"] / base.params,
            },
        },
        "finetune": progress.finetune,
        "time": totals,
    }
    return Result(
        variables=plain,
        widths=widths_from_params(plain["params"]),
        keep={k: np.asarray(v, np.int64) for k, v in progress.base_keep.items()},
        history=list(progress.history),
        summary=summary,
    )
