"""Criteria clustering per layer (He et al., ICANN 2021): rank similarity, agglomeration, medoids.

Within one channel group, every pair of pool criteria is compared by the rank correlation of
their scores (Spearman's rho by default, Kendall's tau-b as an option). Criteria that rank the
channels alike carry the same information, so they are merged bottom-up (agglomerative
clustering on the similarity) and each cluster sends one representative, its medoid, to the
blend. The correlations (`scipy.stats`) and the agglomeration (`scipy.cluster.hierarchy`) are
those of `jaxprune.methods.clustering`, shared with functional pruning. The paper does not fix
the similarity, the linkage, the stopping rule or the representative: each is a choice of
jaxprune, and a field of `ClusterConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.methods import clustering

SIMILARITIES = clustering.RANK_SIMILARITIES
LINKAGES = clustering.LINKAGES
REPRESENTATIVES = ("medoid", "first")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the criteria of one layer are grouped."""

    # Rank correlation between two criteria's scores: "spearman" (rho) or "kendall" (tau-b).
    similarity: str = "spearman"
    # Clusters merge while their linkage similarity is at least this (ignored when
    # num_clusters > 0). 0.7 joins criteria that agree on most of the ranking (e.g. L1 and L2,
    # BN gamma and its Taylor) and keeps ones that disagree apart.
    threshold: float = 0.7
    # Merge until this many clusters remain per layer (0: use `threshold` instead).
    num_clusters: int = 0
    # Similarity of two clusters: "average" (mean over member pairs), "complete" (the least
    # similar pair) or "single" (the most similar pair).
    linkage: str = "average"
    # A cluster's representative: "medoid" (highest mean similarity to its cluster, ties to the
    # earlier criterion of the pool) or "first" (the earliest criterion of the pool).
    representative: str = "medoid"


@dataclasses.dataclass(frozen=True)
class LayerClusters:
    """The clustering of one group's criteria.

    Attributes:
      group: the channel group's name.
      criteria: the criteria that scored this group, in pool order.
      similarity: their pairwise rank correlations, shape (n, n); NaN pairs (a criterion with
        constant scores) count as 0.
      clusters: each cluster's criteria, in pool order; clusters ordered by their first member.
      representatives: one criterion per cluster, the candidates of the blend.
    """

    group: str
    criteria: tuple[str, ...]
    similarity: np.ndarray
    clusters: tuple[tuple[str, ...], ...]
    representatives: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (the similarity matrix as nested lists)."""
        return {
            "group": self.group,
            "criteria": list(self.criteria),
            "similarity": np.round(self.similarity, 6).tolist(),
            "clusters": [list(c) for c in self.clusters],
            "representatives": list(self.representatives),
        }


def check_cluster_config(config: ClusterConfig) -> None:
    """Refuses a bad `ClusterConfig`.

    Args:
      config: the settings.

    Raises:
      ValueError: naming the bad field and its valid values.
    """
    if config.similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {config.similarity!r}.")
    if config.linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {config.linkage!r}.")
    if config.representative not in REPRESENTATIVES:
        raise ValueError(
            f"representative must be one of {REPRESENTATIVES}, got {config.representative!r}."
        )
    if config.num_clusters < 0:
        raise ValueError(
            f"num_clusters must be >= 0 (0: use threshold), got {config.num_clusters}."
        )
    if not -1.0 <= config.threshold <= 1.0:
        raise ValueError(f"threshold is a correlation in [-1, 1], got {config.threshold}.")


def kendall_tau(a: Any, b: Any) -> float:
    """Kendall's tau-b: concordant minus discordant pairs, corrected for ties (`scipy.stats`).

    ``tau_b = sum_{i<j} sign(a_i - a_j) sign(b_i - b_j) / sqrt(n_a * n_b)`` where n_a (n_b)
    counts the pairs not tied in a (b).

    Args:
      a: a 1-D vector of scores.
      b: a 1-D vector of the same length.

    Returns:
      tau-b in [-1, 1]; NaN when either vector is constant.

    Raises:
      ValueError: different shapes, fewer than two entries, or NaN entries.
    """
    return clustering.rank_correlation(a, b, "kendall")


def similarity_matrix(scores: Sequence[Any], kind: str = "spearman") -> np.ndarray:
    """Pairwise rank correlations of several criteria's scores of one group.

    Args:
      scores: n vectors of the same length (one per criterion).
      kind: "spearman" or "kendall".

    Returns:
      A symmetric (n, n) float64 matrix with ones on the diagonal; NaN correlations (a
      constant score vector ranks nothing) become 0, i.e. unrelated.
    """
    return clustering.rank_similarity(scores, kind)


def agglomerate(similarity: np.ndarray, config: ClusterConfig) -> list[list[int]]:
    """Bottom-up clustering of items by a similarity matrix (`clustering.merge_tree`).

    Starts from singletons and merges the most similar pair of clusters (linkage per
    `config.linkage`; ties go to the pair with the lowest indices) until `config.num_clusters`
    remain, or, when that is 0, while the best pair's similarity is at least `config.threshold`.

    Args:
      similarity: a symmetric (n, n) matrix.
      config: linkage and stopping rule.

    Returns:
      Clusters as sorted lists of item indices, ordered by their first item.
    """
    check_cluster_config(config)
    n = np.shape(similarity)[0]
    if config.num_clusters:
        labels, _ = clustering.agglomerative_by_count(
            similarity, min(config.num_clusters, n), config.linkage
        )
    else:
        labels = clustering.agglomerative_by_threshold(similarity, config.threshold, config.linkage)
    return clustering.members(labels)


def representative(cluster: Sequence[int], similarity: np.ndarray, kind: str = "medoid") -> int:
    """The member of a cluster that stands for it.

    Args:
      cluster: item indices, sorted.
      similarity: the full similarity matrix.
      kind: "medoid" (highest mean similarity to the members; ties to the lowest index) or
        "first" (the lowest index).

    Returns:
      One index of `cluster`.
    """
    if kind not in REPRESENTATIVES:
        raise ValueError(f"representative must be one of {REPRESENTATIVES}, got {kind!r}.")
    if kind == "first":
        return int(cluster[0])
    mean_similarity = similarity[np.ix_(cluster, cluster)].mean(axis=1)
    return int(cluster[int(np.argmax(mean_similarity))])


def cluster_layer(
    group: str, pool_scores: Mapping[str, Mapping[str, Any]], config: ClusterConfig
) -> LayerClusters:
    """Clusters the criteria that scored one group.

    Args:
      group: the group's name.
      pool_scores: per criterion (in pool order), its scores per group; criteria without
        this group (BatchNorm criteria on a layer without BatchNorm) are left out.
      config: similarity, linkage, stopping rule and representative.

    Returns:
      The group's `LayerClusters`.

    Raises:
      ValueError: no criterion scored the group, or scores that are not finite.
    """
    check_cluster_config(config)
    names = tuple(name for name, scores in pool_scores.items() if group in scores)
    if not names:
        raise ValueError(f"No criterion of the pool scores group {group!r}; add one that does.")
    vectors = [np.asarray(pool_scores[name][group], np.float64) for name in names]
    for name, vector in zip(names, vectors, strict=True):
        if not np.isfinite(vector).all():
            raise ValueError(
                f"Criterion {name!r} gave non-finite scores for {group!r}; cluster the scores of "
                "an unmasked model."
            )
    if vectors[0].size < 2:
        similarity = np.ones((len(names), len(names)))
    else:
        similarity = similarity_matrix(vectors, config.similarity)
    clusters = agglomerate(similarity, config)
    chosen = [representative(c, similarity, config.representative) for c in clusters]
    return LayerClusters(
        group=group,
        criteria=names,
        similarity=similarity,
        clusters=tuple(tuple(names[i] for i in c) for c in clusters),
        representatives=tuple(names[i] for i in chosen),
    )
