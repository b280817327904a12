"""Functionality-oriented filter pruning (Qin, Yu, Liu, Chen, BMVC 2019, arXiv 1810.07322).

Filters whose activation-maximisation images look alike do the same job; keeping one of each
such cluster removes repetition at little cost, even without retraining. Per convolution group:

1. an activation-maximisation image of every filter (`jaxprune.criteria.functionality`, all
   filters of the layer vmapped at once);
2. a descriptor per filter and their cosine similarity: by default its standardised image and
   its responses to every conv layer's images, each half of unit length (chosen on validation
   data because it is stable across seeds and agrees with how alike filters respond to real
   images, where the pixels alone did neither: experiments/results/functional/descriptor.md);
3. clusters (`jaxprune.methods.clustering`, shared with blending): agglomerative with average
   linkage, merged while the mean similarity is at least `clustering.threshold` (default), or
   cut at exactly the number of filters a target `ratio` keeps (the threshold is then read off
   the dendrogram per layer), or k-means with k = that number;
   Filters that their own image does not drive above the start image
   (`jaxprune.criteria.functionality.responsive_filters`: silent ReLU filters, whose images
   are all the same penalty-shaped picture) show no functionality; by default
   (`clustering.separate_unresponsive`) each stays a cluster of its own (similarity -1 to
   every other filter), rather than all of them being merged as "identical";
4. one representative per cluster: the most relevant by `criterion` (Taylor by default, scored
   on the first `score_examples` validation images), or the member closest to the cluster
   centroid; the rest are removed (`jaxprune.prune`: the pruned program, no rebuild).

The method is reconstructed from the paper's abstract (its full text was not available to us);
the descriptor, the similarity, the clustering, the handling of unresponsive filters, the
representative and the ratio-driven cut are choices of jaxprune, each a field of
`FunctionalConfig`. No retraining by
default (the paper's claim is that little is needed); `FunctionalConfig.finetune` fine-tunes
afterwards (`jaxprune.fit.fit`).

The images run the model through its apply function (`jaxprune.gated_call` reads the filters),
so any `jaxprune.Model` works: linen, NNX, or a plain function. With a workdir the run keeps, in
one `jaxprune.run.RunDir` of kind "functional", the images layer by layer (the checkpoint
sequence ``checkpoints/images``, step k holding the first k layers; reused only for the same
model, visualisation settings and layers, a damaged step recomputed), the fine-tuning's
checkpoints and ``result.json``. Rerunning resumes after the last finished layer; another run
there is refused with its changed fields named.

Example::

  model = jp.Model.linen(module, x, variables=variables)
  result = functional_prune(model, variables, validation_batches, FunctionalConfig(ratio=0.5))
  logits = result.model(result.variables, x)  # the pruned program
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxprune import criteria
from jaxprune.checkpoint import CheckpointError, json_default
from jaxprune.criteria.functionality import (
    DESCRIPTORS,
    NORMALIZATIONS,
    RESPONSE_DESCRIPTORS,
    VisualizationConfig,
    check_visualization,
    cosine_similarity,
    filter_descriptors,
    maximization_images,
    response_maps,
    responsive_filters,
)
from jaxprune.fit import FitConfig, fit
from jaxprune.graph import ChannelGraph, channel_graph
from jaxprune.methods import clustering
from jaxprune.methods.contract import PruneData, PruneResult, as_prune_data
from jaxprune.methods.live import checkpointed_steps, open_metrics, write_result
from jaxprune.methods.outcome import finetuned_summary, first_examples
from jaxprune.methods.selection import select_groups
from jaxprune.model import Model
from jaxprune.run import Checkpoints, RunDir, config_identity, fingerprint
from jaxprune.surgery import prune

IMAGES_FORMAT = "jaxprune-functionality-images"
IMAGES = "images"
REPRESENTATIVES = ("criterion", "centroid")
CLUSTERINGS = ("agglomerative", "kmeans")
# Fields that do not change a functional run's result.
_COSMETIC = ("finetune.checkpoint_every",)


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """How each layer's filters are grouped by functionality."""

    # "agglomerative" (average linkage) or "kmeans" (spherical, needs a ratio for k).
    method: str = "agglomerative"
    # Agglomerative without a ratio: clusters merge while their mean cosine similarity is >= this.
    threshold: float = 0.5
    # Descriptor compared: of the image alone (`criteria.functionality.DESCRIPTORS`): "pixels",
    # "pooled" (2x2 average-pooled pixels) or "spectrum" (Fourier magnitudes); or of what the
    # filter does (`RESPONSE_DESCRIPTORS`): "responses" (its maps on every conv layer's images,
    # the probes) or "image+responses" (both halves, each of unit length). The default is the
    # one selected on validation data for describing function
    # (experiments/results/functional/descriptor.md): stable across image seeds for 96-100%
    # of VGG-small's filters, where the pixels of the old default were for 26-53%.
    descriptor: str = "image+responses"
    # Response descriptors: the response maps' most cells per axis (None: every position).
    resolution: int | None = 14
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

    # Criterion that picks each cluster's representative (registry name; "taylor" is our choice:
    # the abstract does not name one).
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
    # The default ascends the pre-activation at the map's centre (the selected setting; see
    # `ClusteringConfig.descriptor`).
    visualization: VisualizationConfig = dataclasses.field(
        default_factory=lambda: VisualizationConfig(objective="center", preactivation=True)
    )
    # "conv": the groups produced by convolutions (what has images); "all" is refused.
    scope: str = "conv"
    # Never leave a group with fewer filters than this.
    min_channels: int = 1
    # Validation images the representative criterion reads.
    score_examples: int = 1024
    # Batch size of scoring (the validation images are re-cut into batches of this size).
    batch_size: int = 128
    # Fine-tuning of the pruned model on the training data (`jaxprune.fit`); None: none, as the
    # paper.
    finetune: FitConfig | None = None
    # Seed of k-means and of the random criterion.
    seed: int = 0

    def check(self) -> None:
        """Refuses bad settings before any image is made (`check_config`)."""
        check_config(self)


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

    def record(self, group: str) -> dict[str, Any]:
        """The layer as a JSON-compatible history record (no images, no similarity)."""
        return {
            "group": group,
            "filters": int(len(self.labels)),
            "clusters": int(len(np.unique(self.labels))),
            # None where no threshold applies (k-means, or nothing merged).
            "threshold": float(self.threshold) if np.isfinite(self.threshold) else None,
            "unresponsive": int(np.sum(~np.asarray(self.responsive, bool))),
            "labels": np.asarray(self.labels).tolist(),
            "keep": np.asarray(self.keep).tolist(),
        }


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
    if config.clustering.descriptor not in DESCRIPTORS + RESPONSE_DESCRIPTORS:
        raise ValueError(
            f"clustering.descriptor must be one of {DESCRIPTORS + RESPONSE_DESCRIPTORS}, got "
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
    if config.finetune is not None:
        if not isinstance(config.finetune, FitConfig):
            raise ValueError(
                f"finetune must be a jaxprune.fit.FitConfig or None, got "
                f"{type(config.finetune).__name__}."
            )
        config.finetune.check()
    check_visualization(config.visualization)


def kept_count(size: int, config: FunctionalConfig) -> int | None:
    """Filters a group of `size` keeps under the config's ratio (None without a ratio)."""
    if config.ratio is None:
        return None
    return min(size, max(config.min_channels, size - int(round(config.ratio * size))))


# ---------------------------------------------------------------------------------------------
# Images, checkpointed per layer


def images_identity(
    graph: ChannelGraph,
    variables: Any,
    groups: Sequence[str],
    input_shape: Sequence[int],
    config: VisualizationConfig,
    apply_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """What a set of stored images depends on: the model, the layers, the input shape and the
    visualisation settings (JSON values)."""
    return json.loads(
        json.dumps(
            {
                "format": IMAGES_FORMAT,
                "groups": list(groups),
                "sizes": [graph[g].size for g in groups],
                "input_shape": list(input_shape),
                "visualization": dataclasses.asdict(config),
                "apply_kwargs": dict(sorted(apply_kwargs.items())),
                "variables": fingerprint(variables),
            },
            default=json_default,
        )
    )


def _restore_images(
    store: Checkpoints, identity: Mapping[str, Any], shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """The images of the newest step stored for `identity`; steps that are damaged or hold
    other images are deleted (and recomputed)."""
    step = store.latest_step()
    while step is not None:
        meta = None
        if step <= len(shapes):
            target = {str(k): jax.ShapeDtypeStruct(shapes[k], np.float32) for k in range(step)}
            try:
                arrays, meta = store.restore(step, target)
            except CheckpointError:
                meta = None
        if meta is not None and meta.get("identity") == identity and meta.get("layers") == step:
            return [np.asarray(arrays[str(k)], np.float32) for k in range(step)]
        store.manager.delete(step)
        step = store.latest_step()
    return []


def layer_images(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    groups: Sequence[str],
    input_shape: tuple[int, ...],
    config: VisualizationConfig | None = None,
    *,
    run: RunDir | None = None,
    workdir: str | None = None,
    progress: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Activation-maximisation images of every filter of each group, resumable.

    Args:
      apply_fn, graph, variables: the model, its channel graph and variables.
      groups: the groups to visualise, in order.
      input_shape: one example's shape, e.g. (28, 28, 1).
      config: the visualisation settings (default `VisualizationConfig()`).
      run: a run directory: each finished layer is checkpointed in its sequence
        ``images`` and a rerun resumes after the last finished layer (images of other
        variables, settings or layers, and damaged steps, are recomputed).
      workdir: instead of `run`, a folder of its own for the images (a `RunDir` of kind
        "functionality-images" whose identity is the images'; other images there are refused).
      progress: show a progress bar over layers.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      Per group, float32 images (filters, *input_shape).

    Raises:
      ValueError: both `run` and `workdir`.
      jaxprune.run.RunMismatchError: `workdir` holds images of another model or settings.
    """
    config = config if config is not None else VisualizationConfig()
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    if run is not None and workdir is not None:
        raise ValueError("Give layer_images a run directory or a workdir, not both.")
    identity = images_identity(graph, variables, groups, input_shape, config, kwargs)
    if workdir is not None:
        with RunDir.open(workdir, kind="functionality-images", identity=identity) as own:
            return layer_images(
                apply_fn, graph, variables, groups, input_shape, config, run=own,
                progress=progress, apply_kwargs=kwargs,
            )  # fmt: skip
    shapes = [(graph[g].size, *input_shape) for g in groups]
    store = run.checkpoints(IMAGES) if run is not None else None
    done = _restore_images(store, identity, shapes) if store is not None else []
    with tqdm(
        total=len(groups), initial=len(done), desc="functionality images", disable=not progress
    ) as bar:
        for group in groups[len(done) :]:
            images = maximization_images(
                apply_fn, graph, variables, group, tuple(input_shape), config, apply_kwargs=kwargs
            )
            done.append(np.asarray(images, np.float32))
            if store is not None:
                arrays = {str(k): a for k, a in enumerate(done)}
                store.save(len(done), arrays, {"identity": identity, "layers": len(done)})
            bar.update(1)
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
    responses: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Descriptors, similarity and clusters of one layer's images, as `functional_prune` makes them.

    Args:
      images: (filters, H, W, C) the layer's activation-maximisation images.
      responsive: (filters,) bool from `responsive_filters` (None: every filter counts as
        responsive).
      config: descriptor, normalisation, clustering, ratio and min_channels.
      responses: the layer's maps on the probes, (probes, h, w, filters); needed by the
        response descriptors (`probe_responses`).

    Returns:
      (descriptors, similarity, labels, threshold); see `cluster_filters`.
    """
    descriptors = filter_descriptors(
        images,
        config.clustering.descriptor,
        config.clustering.normalization,
        responses=responses,
        resolution=config.clustering.resolution,
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


def _whole_blocks(keep: np.ndarray, block: int) -> np.ndarray:
    """A layer normalised in blocks (GroupNorm) keeps every block that holds a kept filter:
    removing it would remove a function no other cluster member stands for."""
    if block == 1:
        return keep
    blocks = np.unique(np.asarray(keep, np.int64) // block)
    return (blocks[:, None] * block + np.arange(block)).reshape(-1)


def probe_responses(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    images: Mapping[str, np.ndarray],
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Every group's maps on the probes of the response descriptors: the activation-maximisation
    images of every group in `images`, concatenated (one model pass over them for all groups).
    """
    probes = np.concatenate([np.asarray(v) for v in images.values()])
    return response_maps(
        apply_fn, graph, variables, list(images), probes, apply_kwargs=apply_kwargs
    )


def functional_layers(
    apply_fn: Callable[..., Any],
    graph: ChannelGraph,
    variables: Any,
    images: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray] | None,
    config: FunctionalConfig,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, LayerFunctionality]:
    """Per group, the clusters of its filters' images and the representatives kept.

    Args:
      apply_fn, graph, variables: the model, its graph and variables (which filters their own
        image drives is read by running it).
      images: per group, (filters, *input_shape) images made with `config.visualization`.
      scores: per group, the representative criterion's scores (None: centroids).
      config: descriptor, clustering, ratio and minimum.
      apply_kwargs: keyword arguments of `apply_fn` (default ``{"train": False}``).

    Returns:
      ``{group: LayerFunctionality}`` in the order of `images`.

    Raises:
      ValueError: images of the wrong shape.
    """
    layers: dict[str, LayerFunctionality] = {}
    responses: Mapping[str, np.ndarray] = {}
    if config.clustering.descriptor in RESPONSE_DESCRIPTORS:
        responses = probe_responses(apply_fn, graph, variables, images, apply_kwargs=apply_kwargs)
    for group, group_images in images.items():
        group_images = np.asarray(group_images)
        if group_images.ndim < 2 or group_images.shape[0] != graph[group].size:
            raise ValueError(
                f"images[{group!r}] has shape {group_images.shape}; the group needs one image "
                f"per filter ({graph[group].size})."
            )
        responsive = responsive_filters(
            apply_fn, graph, variables, group, group_images, config.visualization,
            apply_kwargs=apply_kwargs,
        )  # fmt: skip
        descriptors, similarity, labels, threshold = layer_clusters(
            group_images, responsive, config, responses.get(group)
        )
        group_scores = None if scores is None else np.asarray(scores[group], np.float64)
        if group_scores is not None:
            keep = choose_representatives(labels, scores=group_scores)
            value = group_scores
        else:
            keep = choose_representatives(labels, descriptors=descriptors)
            value = -np.arange(len(labels), dtype=np.float64)
        keep = _top_up(keep, value, min(config.min_channels, graph[group].size))
        keep = _whole_blocks(keep, graph[group].block)
        layers[group] = LayerFunctionality(
            images=group_images,
            similarity=similarity,
            labels=labels,
            responsive=responsive,
            keep=keep,
            threshold=threshold,
            scores=group_scores,
        )
    return layers


def _score_batches(data: PruneData, config: FunctionalConfig) -> list[dict[str, np.ndarray]]:
    """The validation images the representative criterion reads (none for centroids or a
    weight criterion)."""
    if config.representative != "criterion":
        return []
    if not criteria.get_criterion(config.criterion, **_options(config)).uses_batches:
        return []
    return first_examples(data.validation(), config.score_examples, config.batch_size)


def _options(config: FunctionalConfig) -> dict[str, Any]:
    return {"seed": config.seed} if config.criterion == "random" else {}


def functional_prune(
    model: Model,
    variables: Mapping[str, Any],
    data: Any,
    config: FunctionalConfig = FunctionalConfig(),
    *,
    workdir: str | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prunes every conv group to one filter per functionality cluster, then optionally
    fine-tunes.

    Args:
      model: the model (`jaxprune.Model`: linen, NNX or any apply function); the images have
        the shape of its example input.
      variables: its trained variables.
      data: the representative criterion reads the first `score_examples` images of
        ``data.validation()`` (never the test split); fine-tuning reads ``data.train(epoch)``.
        See `methods.contract.as_prune_data`.
      config: clustering, representatives, visualisation, fine-tuning; see `FunctionalConfig`.
      workdir: where the run keeps its images (per layer), the fine-tuning's checkpoints and
        ``result.json``; rerunning resumes, and another run there is refused. None: nothing
        kept.
      progress: progress bars over layers and fine-tuning.

    Returns:
      A `PruneResult`: the pruned program and its final variables, the kept filters, one
      history record per layer (filters, clusters, threshold, unresponsive filters, labels,
      kept filters), and a summary with the cost, the validation metrics before pruning,
      after pruning (``"pruned"``, before fine-tuning) and at the end, the fine-tuning's
      history and the method's report (``summary["method"]``).

    Raises:
      ValueError: a bad config (before any work), or a model without conv groups.
      jaxprune.run.RunMismatchError: the workdir holds another run.
    """
    config.check()
    data = as_prune_data(data, batch_size=config.batch_size, seed=config.seed)
    graph = channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    groups = select_groups(graph, config.scope)
    if not groups:
        raise ValueError("The model has no conv group: functional pruning needs convolutions.")
    input_shape = tuple(model.example_input.shape[1:])
    score_batches = _score_batches(data, config)
    identity = {
        "config": config_identity(config, _COSMETIC),
        "variables": fingerprint(variables),
        "data": fingerprint(score_batches) if score_batches else None,
    }
    with RunDir.maybe(workdir, kind="functional", identity=identity) as run:
        images = layer_images(
            model.apply_fn, graph, variables, groups, input_shape, config.visualization,
            run=run, progress=progress, apply_kwargs=model.eval_kwargs,
        )  # fmt: skip
        scores = None
        if config.representative == "criterion":
            context = criteria.ScoringContext(model.apply_fn, graph, apply_kwargs=model.eval_kwargs)
            scores = criteria.score(
                config.criterion, context, variables, score_batches, **_options(config)
            )
        layers = functional_layers(
            model.apply_fn, graph, variables, images, scores, config,
            apply_kwargs=model.eval_kwargs,
        )  # fmt: skip
        keep = {group: layer.keep for group, layer in layers.items()}
        pruned = prune(variables, graph, keep)
        small = model.with_apply_fn(pruned.apply_fn)
        final, tuning = pruned.variables, []
        metrics = open_metrics(run, checkpointed_steps(run, "finetune"))
        if config.finetune is not None:
            final, tuning = fit(
                small, pruned.variables, data, config.finetune, run=run, name="finetune",
                progress=progress, metrics=metrics,
            )  # fmt: skip
        summary = finetuned_summary(model, variables, small, pruned.variables, final, data, tuning)
        history = tuple(layer.record(group) for group, layer in layers.items())
        summary["method"] = {
            "name": "functional",
            "criterion": config.criterion if config.representative == "criterion" else None,
            "representative": config.representative,
            "layers": {
                r["group"]: {k: r[k] for k in ("filters", "clusters", "threshold", "unresponsive")}
                for r in history
            },
        }
        write_result(metrics, (tuning[-1]["step"] if tuning else 0) + 1, summary)
        if run is not None:
            run.write_json("result.json", summary)
    return PruneResult("functional", small, final, keep, graph, history, summary)
