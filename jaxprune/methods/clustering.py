"""The one clustering of jaxprune: agglomerative on a similarity matrix, k-means, rank similarity.

Two methods cluster: blending (He et al. 2021) groups the criteria of a layer by the rank
similarity of their scores (`blending_clusters`), and functional pruning (Qin et al. 2019)
groups the filters of a layer by the cosine similarity of their activation-maximisation images
(`functional`). Both use this module.

Agglomerative clustering starts from singletons and repeatedly merges the two most similar
clusters; the similarity of two clusters (the *linkage*) is the mean over their member pairs
("average", UPGMA), the least similar pair ("complete") or the most similar pair ("single").
The merge sequence comes from `scipy.cluster.hierarchy.linkage` on the distance ``1 - S``
(where pairs tie, from a greedy loop that breaks ties by the lowest first members, see
`merge_tree`); the linkage similarity of every merge is then read from `S` itself (the mean,
minimum or maximum of the two clusters' block of `S`), so thresholds compare values of `S`, not
of ``1 - S``. All
three linkages are monotone (a merge's linkage never exceeds the previous one's), so

* a similarity threshold t keeps the merges made while the best linkage is >= t, and
* a target of k clusters keeps the first n - k merges; the equivalent threshold is the linkage
  of the (n - k)-th merge, read off the dendrogram exactly (not by bisection). When merges
  tie, merge order breaks the tie, so the count is always exact.

Labels are numbered 0, 1, ... in order of each cluster's first member, so equal partitions give
equal labels. Rank similarity (Spearman's rho, Kendall's tau-b) comes from `scipy.stats`.
Everything here runs on the host in NumPy/SciPy: a layer has a dozen criteria or a few hundred
filters, and nothing is jitted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from jaxprune.criteria.rank_correlation import paired_scores

LINKAGES = ("average", "complete", "single")
RANK_SIMILARITIES = ("spearman", "kendall")
_REDUCE = {"average": np.mean, "complete": np.min, "single": np.max}


@dataclasses.dataclass(frozen=True)
class MergeTree:
    """The merges of agglomerative clustering, in the order they happen.

    Attributes:
      pairs: (n - 1, 2) the cluster ids merged at each step; cluster ids 0..n-1 are the
        singletons, id n + s is the cluster made by merge s.
      linkage: (n - 1,) the linkage similarity of each merge (non-increasing).
    """

    pairs: np.ndarray
    linkage: np.ndarray

    @property
    def size(self) -> int:
        """The number of items clustered."""
        return len(self.linkage) + 1


def check_linkage(linkage: str) -> None:
    """Raises ValueError unless `linkage` is one of `LINKAGES`."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}.")


def _check_similarity(similarity: Any) -> np.ndarray:
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {s.shape}.")
    if not np.isfinite(s).all():
        raise ValueError("similarity must be finite (a NaN or inf entry cannot be clustered).")
    if not np.allclose(s, s.T, atol=1e-9):
        raise ValueError("similarity must be symmetric (S[i, j] == S[j, i]).")
    return s


def merge_tree(similarity: Any, linkage: str = "average") -> MergeTree:
    """Agglomerative clustering of n items: the full merge sequence.

    Each step merges the two most similar clusters; when several pairs tie, the pair whose
    clusters have the lowest first members (compared lexicographically) merges first. scipy
    (`scipy.cluster.hierarchy.linkage` on ``1 - S``) computes the sequence when no two distances
    are equal, which is when no tie can arise (for "average", barring two means that coincide
    exactly); its nearest-neighbour chain breaks ties its own way, so a matrix with equal entries
    (duplicate items, filters set to -1, constant criteria at 0) is merged by the greedy loop
    that states the rule.

    Args:
      similarity: (n, n) symmetric similarity matrix (higher = more alike); its diagonal is
        not read.
      linkage: "average", "complete" or "single".

    Returns:
      The `MergeTree`, each merge's linkage read from `similarity` (the mean, minimum or
      maximum of the two clusters' block).
    """
    check_linkage(linkage)
    s = _check_similarity(similarity)
    n = s.shape[0]
    if n == 1:
        return MergeTree(pairs=np.zeros((0, 2), np.int64), linkage=np.zeros(0))
    s = (s + s.T) / 2.0
    # A similarity a rounding error above 1 is a distance a rounding error below 0.
    distance = np.maximum(1.0 - s, 0.0)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    if np.unique(condensed).size == condensed.size:
        z = hierarchy.linkage(condensed, method=linkage)
        pairs = np.sort(z[:, :2].astype(np.int64), axis=1)
    else:
        pairs = _greedy_pairs(s, linkage)
    clusters: list[list[int]] = [[i] for i in range(n)]
    values = np.zeros(n - 1)
    reduce = _REDUCE[linkage]
    for step, (a, b) in enumerate(pairs):
        values[step] = float(reduce(s[np.ix_(clusters[a], clusters[b])]))
        clusters.append(clusters[a] + clusters[b])
    return MergeTree(pairs=pairs, linkage=values)


def _greedy_pairs(s: np.ndarray, linkage: str) -> np.ndarray:
    """The merge sequence by the rule itself: the most similar pair of clusters first, ties to
    the lowest first members. O(n^3) in NumPy (a cluster lives in the row of its first member)."""
    n = s.shape[0]
    sums = s.copy()  # average: sums of similarities; complete / single: the linkage itself
    sizes = np.ones(n)
    active = np.ones(n, bool)
    ids = np.arange(n)
    pairs = np.zeros((n - 1, 2), np.int64)
    for step in range(n - 1):
        current = sums / np.outer(sizes, sizes) if linkage == "average" else sums.copy()
        current[~active, :] = -np.inf
        current[:, ~active] = -np.inf
        np.fill_diagonal(current, -np.inf)
        # The first maximum in row-major order: the lowest (row, column).
        a, b = sorted(divmod(int(np.argmax(current)), n))
        pairs[step] = sorted((ids[a], ids[b]))
        if linkage == "average":
            sums[a, :] += sums[b, :]
            sums[:, a] += sums[:, b]
        else:
            combine = np.minimum if linkage == "complete" else np.maximum
            sums[a, :] = combine(sums[a, :], sums[b, :])
            sums[:, a] = sums[a, :]
        sizes[a] += sizes[b]
        active[b] = False
        ids[a] = n + step
    return pairs


def canonical_labels(labels: Any) -> np.ndarray:
    """Renumbers labels 0, 1, ... in order of first appearance."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(len(order), np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[np.unique(labels, return_inverse=True)[1].reshape(-1)]


def cut_tree(tree: MergeTree, merges: int) -> np.ndarray:
    """Labels after the first `merges` merges of `tree` (n - merges clusters)."""
    n = tree.size
    if not 0 <= merges <= n - 1:
        raise ValueError(f"merges must be in [0, {n - 1}], got {merges}.")
    parent = np.arange(2 * n - 1)
    for step in range(merges):
        a, b = tree.pairs[step]
        parent[a] = parent[b] = n + step

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    return canonical_labels(np.array([root(i) for i in range(n)]))


def merges_above(tree: MergeTree, threshold: float) -> int:
    """How many merges are made while the best linkage is >= `threshold` (a prefix of the
    merge sequence)."""
    below = np.nonzero(tree.linkage < threshold)[0]
    return int(below[0]) if below.size else len(tree.linkage)


def agglomerative_by_threshold(
    similarity: Any, threshold: float, linkage: str = "average"
) -> np.ndarray:
    """Clusters merged while their linkage similarity is >= `threshold`.

    Args:
      similarity: (n, n) symmetric similarity.
      threshold: the similarity two clusters need (by `linkage`) to be merged.
      linkage: "average", "complete" or "single".

    Returns:
      One label per item.
    """
    tree = merge_tree(similarity, linkage)
    return cut_tree(tree, merges_above(tree, threshold))


def agglomerative_by_count(
    similarity: Any, clusters: int, linkage: str = "average"
) -> tuple[np.ndarray, float]:
    """Clusters cut at exactly `clusters` clusters.

    Args:
      similarity: (n, n) symmetric similarity.
      clusters: how many clusters (1..n).
      linkage: "average", "complete" or "single".

    Returns:
      (labels, threshold): the labels and the similarity threshold that gives this cut (the
      linkage of the last merge made; +inf when no merge is made).
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, {n}], got {clusters}.")
    tree = merge_tree(s, linkage)
    merges = n - clusters
    threshold = float(tree.linkage[merges - 1]) if merges > 0 else math.inf
    return cut_tree(tree, merges), threshold


def members(labels: Any) -> list[list[int]]:
    """The items of each cluster, sorted, clusters ordered by their first item."""
    labels = canonical_labels(labels)
    return [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]


def rank_correlation(a: Any, b: Any, kind: str = "spearman") -> float:
    """Spearman's rho or Kendall's tau-b of two score vectors (`scipy.stats`), ties averaged.

    Args:
      a: a 1-D vector of scores.
      b: a 1-D vector of the same length.
      kind: "spearman" or "kendall".

    Returns:
      The correlation in [-1, 1]; NaN when either vector is constant (it ranks nothing).

    Raises:
      ValueError: an unknown kind, different shapes, fewer than two entries, or NaN entries.
    """
    if kind not in RANK_SIMILARITIES:
        raise ValueError(f"similarity must be one of {RANK_SIMILARITIES}, got {kind!r}.")
    a, b = paired_scores(kind, a, b)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # scipy would warn and return NaN
    if kind == "spearman":
        value = stats.spearmanr(a, b).statistic
    else:
        value = stats.kendalltau(a, b).statistic
    return float(np.clip(value, -1.0, 1.0))


def rank_similarity(scores: Sequence[Any], kind: str = "spearman") -> np.ndarray:
    """Pairwise rank correlations of several score vectors (e.g. criteria of one layer).

    Args:
      scores: n vectors of the same length.
      kind: "spearman" or "kendall".

    Returns:
      A symmetric (n, n) float64 matrix with ones on the diagonal; NaN correlations (a
      constant vector ranks nothing) become 0, i.e. unrelated.
    """
    if kind not in RANK_SIMILARITIES:
        raise ValueError(f"similarity must be one of {RANK_SIMILARITIES}, got {kind!r}.")
    n = len(scores)
    matrix = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            value = rank_correlation(scores[i], scores[j], kind)
            matrix[i, j] = matrix[j, i] = 0.0 if math.isnan(value) else value
    return matrix


def kmeans(descriptors: Any, clusters: int, *, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """Spherical k-means (cosine similarity) with k-means++ seeding.

    Rows are scaled to unit length, each is assigned to the centroid of highest cosine
    similarity, and centroids are the re-normalised means. A cluster that empties is re-seeded
    with the row least similar to its centroid. (scipy's k-means is Euclidean and seeds
    differently, so this one stays.)

    Args:
      descriptors: (n, d) descriptor rows.
      clusters: k, 1..n.
      seed: seed of the k-means++ choice.
      iterations: at most this many assignment rounds (stops earlier when stable).

    Returns:
      One label per row.
    """
    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"descriptors must be a non-empty (n, d) array, got shape {x.shape}.")
    n = x.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, {n}], got {clusters}.")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    for _ in range(1, clusters):
        distance = 1.0 - np.max(unit @ unit[chosen].T, axis=1)
        distance = np.maximum(distance, 0.0)
        distance[chosen] = 0.0
        total = distance.sum()
        if total <= 0:
            # All remaining rows coincide with a centre: take the first unused ones.
            chosen.append(int(np.setdiff1d(np.arange(n), chosen)[0]))
        else:
            chosen.append(int(rng.choice(n, p=distance / total)))
    centroids = unit[chosen].copy()
    labels = np.full(n, -1)
    for _ in range(iterations):
        similarity = unit @ centroids.T
        new = np.argmax(similarity, axis=1)
        for c in range(clusters):
            if not np.any(new == c):
                fit = similarity[np.arange(n), new]
                worst = int(np.argmin(fit))
                new[worst] = c
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(clusters):
            mean = unit[labels == c].mean(axis=0)
            centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
    return canonical_labels(labels)
