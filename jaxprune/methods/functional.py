"""Functionality-oriented filter pruning (Qin, Yu, Liu, Chen, BMVC 2019, arXiv 1810.07322).

Filters whose activation-maximisation images look alike do the same job; keeping one of each
such cluster removes repetition at little cost, even without retraining. Per convolution group:

1. an activation-maximisation image of every filter (`jaxprune.criteria.functionality`, all
   filters of the layer vmapped at once);
2. a descriptor per image (the standardised pixels by default) and their cosine similarity;
3. clusters: agglomerative with average linkage, merged while the mean similarity is at least
   `clustering.threshold` (default), or cut at exactly the number of filters a target `ratio`
   keeps (the threshold is then read off the dendrogram per layer, see
   `jaxprune.methods.clustering`), or k-means with k = that number;
   Filters that their own image does not drive above the start image
   (`jaxprune.criteria.functionality.responsive_filters`: silent ReLU filters, whose images
   are all the same penalty-shaped picture) show no functionality; by default
   (`clustering.separate_unresponsive`) each stays a cluster of its own (similarity -1 to
   every other filter), rather than all of them being merged as "identical". The paper does
   not discuss such filters; this is a choice of jaxprune;
4. one representative per cluster: the most relevant by `criterion` (Taylor by default, scored
   on validation images), or the member closest to the cluster centroid; the rest are removed.

No retraining by default (the paper's claim is that little is needed); `jaxprune prune
--method functional --finetune-epochs N` fine-tunes afterwards.

`functional_prune` is the pure function over (apply_fn, graph, variables, data); given a
`workdir` it checkpoints each layer's images (orbax + a JSON meta) and resumes from them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxprune import checkpoint, criteria
from jaxprune.criteria.base import iter_batches
from jaxprune.criteria.functionality import (
    DESCRIPTORS,
    NORMALIZATIONS,
    VisualizationConfig,
    check_visualization,
    cosine_similarity,
    image_descriptors,
    maximization_images,
    responsive_filters,
)
from jaxprune.graph import ChannelGraph
from jaxprune.methods import clustering
from jaxprune.methods.oneshot import select_groups
from jaxprune.surgery import Pruned, prune

IMAGES_FORMAT = "jaxprune-functionality-images"
REPRESENTATIVES = ("criterion", "centroid")
CLUSTERINGS = ("agglomerative", "kmeans")


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """How each layer's filters are grouped by functionality."""

    # "agglomerative" (average linkage) or "kmeans" (spherical, needs a ratio for k).
    method: str = "agglomerative"
    # Agglomerative without a ratio: clusters merge while their mean cosine similarity is >= this.
    threshold: float = 0.5
    # Image descriptor compared: "pixels" (default) or "pooled" (2x2 average-pooled pixels).
    descriptor: str = "pixels"
    # Per-image normalisation before the cosine: "standardize", "l2" or "none".
    normalization: str = "standardize"
    # k-means: at most this many assignment rounds.
    kmeans_iterations: int = 100
    # Never merge a filter that its own image does not drive (its image shows no function);
    # False treats those images like any other (they are identical, so they merge first).
    separate_unresponsive: bool = True


@dataclasses.dataclass(frozen=True)
class FunctionalConfig:
    """Functionality-oriented pruning: images, clusters, representatives, optional fine-tuning."""

    # Criterion that picks each cluster's representative (registry name; "taylor" as the paper).
    criterion: str = "taylor"
    # "criterion": keep the cluster's most relevant filter; "centroid": keep the filter closest
    # (in cosine similarity) to the mean of the cluster's descriptors.
    representative: str = "criterion"
    # Fraction of every pruned group's filters to remove (clusters are cut to the kept count);
    # None: the clustering threshold decides how many go.
    ratio: float | None = None
    # Clustering method, threshold, descriptor and normalisation.
    clustering: ClusteringConfig = dataclasses.field(default_factory=ClusteringConfig)
    # Activation-maximisation settings (steps, step size, L2 / TV weights, jitter, blur, seed).
    visualization: VisualizationConfig = dataclasses.field(default_factory=VisualizationConfig)
    # "conv": the groups produced by convolutions (what has images); "all" is refused.
    scope: str = "conv"
    # Never leave a group with fewer filters than this.
    min_channels: int = 1
    # Validation images the representative criterion reads.
    score_examples: int = 1024
    # Batch size of scoring and evaluation.
    batch_size: int = 128
    # Epochs of fine-tuning after pruning (SGD, momentum 0.9, cosine); 0: none, as the paper.
    finetune_epochs: int = 0
    # Peak learning rate of that fine-tuning.
    finetune_lr: float = 0.01
    # Seed of k-means, the random criterion and the fine-tuning.
    seed: int = 0
    # Show a progress bar over layers.
    progress: bool = False


@dataclasses.dataclass(frozen=True)
class LayerFunctionality:
    """What the method found in one channel group.

    Attributes:
      images: (filters, H, W, C) activation-maximisation images.
      similarity: (filters, filters) cosine similarity of their descriptors.
      labels: the cluster of every filter (0, 1, ... in order of first member).
      responsive: whether each filter's image drives it above the start image.
      keep: sorted indices of the representatives kept.
      threshold: the similarity threshold of the cut (with a ratio: the one that gives the
        kept count; +inf when nothing is merged; NaN for k-means).
      scores: the representative criterion's scores, when it was used.
    """

    images: np.ndarray
    similarity: np.ndarray
    labels: np.ndarray
    responsive: np.ndarray
    keep: np.ndarray
    threshold: float
    scores: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class FunctionalResult:
    """The pruned model and, per group, its images, clusters and representatives."""

    pruned: Pruned
    layers: dict[str, LayerFunctionality]


def check_config(config: FunctionalConfig) -> None:
    """Raises ValueError naming a bad field of `config` and the values it accepts.

    Called before any image is made, so a typo costs nothing.
    """
    if config.ratio is not None and not 0.0 <= config.ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1) or None, got {config.ratio}: the part removed.")
    if config.representative not in REPRESENTATIVES:
        raise ValueError(
            f"representative must be one of {REPRESENTATIVES}, got {config.representative!r}."
        )
    if config.clustering.method not in CLUSTERINGS:
        raise ValueError(
            f"clustering.method must be one of {CLUSTERINGS}, got {config.clustering.method!r}."
        )
    if config.representative == "criterion" and config.criterion not in criteria.CRITERIA:
        raise ValueError(
            f"Unknown criterion {config.criterion!r} for the representatives; choose one of "
            f"{sorted(criteria.CRITERIA)}, or representative='centroid'."
        )
    if config.clustering.descriptor not in DESCRIPTORS:
        raise ValueError(
            f"clustering.descriptor must be one of {DESCRIPTORS}, got "
            f"{config.clustering.descriptor!r}."
        )
    if config.clustering.normalization not in NORMALIZATIONS:
        raise ValueError(
            f"clustering.normalization must be one of {NORMALIZATIONS}, got "
            f"{config.clustering.normalization!r}."
        )
    if config.clustering.kmeans_iterations < 1:
        raise ValueError(
            f"clustering.kmeans_iterations must be >= 1, got {config.clustering.kmeans_iterations}."
        )
    if config.batch_size < 1 or config.score_examples < 1:
        raise ValueError(
            f"batch_size and score_examples must be >= 1, got {config.batch_size} and "
            f"{config.score_examples}."
        )
    if config.clustering.method == "kmeans" and config.ratio is None:
        raise ValueError(
            "k-means needs a target ratio for k: set ratio (e.g. 0.5), or use "
            "clustering.method='agglomerative' with a threshold."
        )
    if config.scope != "conv":
        raise ValueError(
            f"scope must be 'conv' (activation-maximisation images are of conv filters), got "
            f"{config.scope!r}."
        )
    if config.min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {config.min_channels}.")
    if config.finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be >= 0, got {config.finetune_epochs}.")
    check_visualization(config.visualization)


def kept_count(size: int, config: FunctionalConfig) -> int | None:
    """Filters a group of `size` keeps under the config's ratio (None without a ratio)."""
    if config.ratio is None:
        return None
    return min(size, max(config.min_channels, size - int(round(config.ratio * size))))


# ---------------------------------------------------------------------------------------------
# Images, checkpointed per layer


class _ImageStore:
    """Per-layer images in an orbax directory: step k holds the first k layers' images."""

    def __init__(self, directory: Path, meta: Mapping[str, Any]) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        handlers = {"images": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=options, item_handlers=handlers
        )
        self.meta = dict(meta)

    def restore(self, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        step = self.manager.latest_step()
        if step is None:
            return []
        stored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        expected = {**self.meta, "layers_done": step}
        if stored.meta != json.loads(json.dumps(expected)):
            raise ValueError(
                f"{self.manager.directory} holds images of another model or configuration "
                f"(stored {stored.meta}); use a fresh workdir or delete that folder."
            )
        target = {str(k): np.zeros(shapes[k], np.float32) for k in range(step)}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(images=ocp.args.StandardRestore(target))
        )
        return [np.asarray(restored.images[str(k)]) for k in range(step)]

    def save(self, images: Sequence[np.ndarray]) -> None:
        step = len(images)
        arrays = {str(k): np.asarray(a) for k, a in enumerate(images)}
        meta = {**self.meta, "layers_done": step}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                images=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def layer_images(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    groups: Sequence[str],
    input_shape: tuple[int, ...],
    config: VisualizationConfig | None = None,
    *,
    workdir: str | Path | None = None,
    progress: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Activation-maximisation images of every filter of each group, resumable.

    Args:
      apply_fn, graph, variables: the model, its channel graph and variables.
      groups: the groups to visualise, in order.
      input_shape: one example's shape, e.g. (28, 28, 1).
      config: the visualisation settings (default `VisualizationConfig()`).
      workdir: if given, each finished layer is checkpointed there and a rerun resumes after
        the last finished layer (refusing images of other variables or settings).
      progress: show a progress bar over layers.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      Per group, float32 images (filters, *input_shape).
    """
    config = config if config is not None else VisualizationConfig()
    shapes = [(graph[g].size, *input_shape) for g in groups]
    store = None
    done: list[np.ndarray] = []
    if workdir is not None:
        meta = {
            "format": IMAGES_FORMAT,
            "groups": list(groups),
            "input_shape": list(input_shape),
            "visualization": dataclasses.asdict(config),
            "variables": checkpoint.tree_fingerprint(variables),
        }
        store = _ImageStore(Path(workdir), meta)
        done = store.restore(shapes)
    try:
        bar = tqdm(groups, desc="functionality images", disable=not progress, initial=len(done))
        for group in groups[len(done) :]:
            images = maximization_images(
                apply_fn,
                graph,
                variables,
                group,
                tuple(input_shape),
                config,
                apply_kwargs=apply_kwargs,
            )
            done.append(np.asarray(images, np.float32))
            if store is not None:
                store.save(done)
            bar.update(1)
        bar.close()
    finally:
        if store is not None:
            store.close()
    return dict(zip(groups, done, strict=True))


# ---------------------------------------------------------------------------------------------
# Clusters and representatives


def cluster_filters(
    similarity: np.ndarray,
    descriptors: np.ndarray,
    config: ClusteringConfig,
    *,
    keep: int | None = None,
    seed: int = 0,
    responsive: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Clusters one layer's filters.

    Args:
      similarity: (n, n) cosine similarity of the filters' descriptors.
      descriptors: (n, d) the descriptors (k-means clusters these).
      config: method and threshold.
      keep: the number of clusters wanted (None: the threshold decides; k-means needs it).
      seed: k-means seed.
      responsive: (n,) bool, whether each filter's image drives it (None: all do). With
        `config.separate_unresponsive`, the others are never merged: agglomerative clustering
        sees them at similarity -1 to everything; k-means clusters the responsive filters into
        `keep` minus their number (and, when that leaves no cluster, clusters all filters).

    Returns:
      (labels, threshold): one cluster label per filter, and the similarity threshold of the
      cut (NaN for k-means).
    """
    n = len(similarity)
    silent = np.zeros(n, bool)
    if responsive is not None and config.separate_unresponsive:
        silent = ~np.asarray(responsive, bool)
        if silent.shape != (n,):
            raise ValueError(f"responsive must have one flag per filter ({n}), got {silent.shape}.")
    if config.method == "kmeans":
        if keep is None:
            raise ValueError("k-means needs the number of clusters (a target ratio).")
        room = keep - int(silent.sum())
        if not silent.any() or room < 1:
            labels = clustering.kmeans(
                descriptors, keep, seed=seed, iterations=config.kmeans_iterations
            )
            return labels, float("nan")
        labels = np.empty(n, np.int64)
        labels[~silent] = clustering.kmeans(
            np.asarray(descriptors)[~silent], room, seed=seed, iterations=config.kmeans_iterations
        )
        labels[silent] = room + np.arange(int(silent.sum()))
        return clustering.canonical_labels(labels), float("nan")
    if config.method != "agglomerative":
        raise ValueError(f"clustering.method must be one of {CLUSTERINGS}, got {config.method!r}.")
    if silent.any():
        similarity = np.array(similarity, np.float64)
        similarity[silent, :] = -1.0
        similarity[:, silent] = -1.0
        np.fill_diagonal(similarity, 1.0)
    if keep is None:
        return clustering.agglomerative_by_threshold(similarity, config.threshold), float(
            config.threshold
        )
    return clustering.agglomerative_by_count(similarity, keep)


def layer_clusters(
    images: np.ndarray,
    responsive: np.ndarray | None,
    config: FunctionalConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Descriptors, similarity and clusters of one layer's images, as `functional_prune` makes them.

    Args:
      images: (filters, H, W, C) the layer's activation-maximisation images.
      responsive: (filters,) bool from `responsive_filters` (None: every filter counts as
        responsive).
      config: descriptor, normalisation, clustering, ratio and min_channels.

    Returns:
      (descriptors, similarity, labels, threshold); see `cluster_filters`.
    """
    descriptors = image_descriptors(
        images, config.clustering.descriptor, config.clustering.normalization
    )
    similarity = cosine_similarity(descriptors)
    labels, threshold = cluster_filters(
        similarity,
        descriptors,
        config.clustering,
        keep=kept_count(len(images), config),
        seed=config.seed,
        responsive=responsive,
    )
    return descriptors, similarity, labels, threshold


def choose_representatives(
    labels: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    descriptors: np.ndarray | None = None,
) -> np.ndarray:
    """One filter per cluster: the highest-scoring, or (without scores) the closest to the
    centroid of the cluster's unit-length descriptors.

    Ties go to the lower filter index.

    Args:
      labels: the cluster of every filter.
      scores: one relevance score per filter (higher = more relevant).
      descriptors: (n, d) descriptors, used when `scores` is None.

    Returns:
      Sorted indices of the representatives, one per cluster.
    """
    labels = np.asarray(labels)
    if (scores is None) == (descriptors is None):
        raise ValueError("Give exactly one of scores (criterion) or descriptors (centroid).")
    if scores is not None:
        value = np.asarray(scores, np.float64)
    else:
        d = np.asarray(descriptors, np.float64)
        unit = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        value = np.empty(len(labels))
        for c in np.unique(labels):
            members = labels == c
            centroid = unit[members].mean(axis=0)
            value[members] = unit[members] @ centroid
    if value.shape != labels.shape:
        raise ValueError(f"{value.shape[0]} scores for {labels.shape[0]} filters.")
    chosen = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        chosen.append(members[np.argmax(value[members])])  # argmax: the first on ties
    return np.sort(np.asarray(chosen, np.int64))


def _top_up(keep: np.ndarray, value: np.ndarray, minimum: int) -> np.ndarray:
    """Adds the best other filters until `minimum` are kept."""
    if len(keep) >= minimum:
        return keep
    order = [i for i in np.argsort(-value, kind="stable") if i not in set(keep.tolist())]
    return np.sort(np.concatenate([keep, np.asarray(order[: minimum - len(keep)], np.int64)]))


def functional_prune(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    batches: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None,
    config: FunctionalConfig = FunctionalConfig(),
    *,
    input_shape: tuple[int, ...] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    workdir: str | Path | None = None,
) -> FunctionalResult:
    """Prunes every conv group to one filter per functionality cluster.

    Args:
      apply_fn: the model function the graph was built from (any flax module's apply).
      graph: its channel graph.
      variables: the trained variables.
      batches: preprocessed validation batches ``{"image", "label"}`` for a data-driven
        representative criterion (None is fine for weight criteria and "centroid").
      config: clustering, representatives, visualisation; see `FunctionalConfig`.
      input_shape: one example's shape; default: the shape of the first batch's images.
      images: precomputed images per group, made with `config.visualization` (e.g. by
        `layer_images`; their start image decides which filters are responsive); the rest
        are computed.
      workdir: checkpoint folder for the images (resumes from it).

    Returns:
      A `FunctionalResult`: the pruned variables, width spec and keep indices, and per group
      the images, similarity, clusters and representatives.

    Raises:
      ValueError: a bad config, or no way to know the input shape.
    """
    check_config(config)
    batch_list = list(iter_batches(batches))
    if input_shape is None:
        if not batch_list:
            raise ValueError("Pass input_shape=(H, W, C) when no batches are given.")
        input_shape = tuple(np.shape(batch_list[0]["image"])[1:])
    groups = select_groups(graph, config.scope)
    given = dict(images or {})
    missing = [g for g in groups if g not in given]
    found = layer_images(
        apply_fn,
        graph,
        variables,
        missing,
        tuple(input_shape),
        config.visualization,
        workdir=workdir,
        progress=config.progress,
    )
    all_images = {**given, **found}
    scores = None
    if config.representative == "criterion":
        context = criteria.ScoringContext(apply_fn=apply_fn, graph=graph)
        options = {"seed": config.seed} if config.criterion == "random" else {}
        scores = criteria.score(config.criterion, context, variables, batch_list, **options)
    layers: dict[str, LayerFunctionality] = {}
    for group in groups:
        group_images = np.asarray(all_images[group])
        if group_images.shape != (graph[group].size, *input_shape):
            raise ValueError(
                f"images[{group!r}] has shape {group_images.shape}; the group needs "
                f"{(graph[group].size, *input_shape)}."
            )
        responsive = responsive_filters(
            apply_fn, graph, variables, group, group_images, config.visualization
        )
        descriptors, similarity, labels, threshold = layer_clusters(
            group_images, responsive, config
        )
        group_scores = None if scores is None else np.asarray(scores[group], np.float64)
        if group_scores is not None:
            keep = choose_representatives(labels, scores=group_scores)
            value = group_scores
        else:
            keep = choose_representatives(labels, descriptors=descriptors)
            value = -np.arange(len(labels), dtype=np.float64)
        keep = _top_up(keep, value, min(config.min_channels, graph[group].size))
        layers[group] = LayerFunctionality(
            images=group_images,
            similarity=similarity,
            labels=labels,
            responsive=responsive,
            keep=keep,
            threshold=threshold,
            scores=group_scores,
        )
    pruned = prune(variables, graph, {g: layer.keep for g, layer in layers.items()})
    return FunctionalResult(pruned=pruned, layers=layers)
