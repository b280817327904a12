"""Clustering filters by functionality similarity: agglomerative (average linkage) and k-means.

Both work on a similarity matrix or descriptors in NumPy (no scikit-learn) and return one label
per filter, numbered 0, 1, ... in order of each cluster's first member, so equal partitions give
equal labels.

Agglomerative clustering with average linkage (UPGMA) starts from singletons and repeatedly
merges the two clusters whose mean pairwise similarity is highest. `merge_tree` records every
merge with that linkage similarity; average linkage is monotone (the linkage of successive
merges never rises), so

* a similarity threshold t keeps the merges whose linkage is >= t, and
* a target of k clusters keeps the first n - k merges; the equivalent threshold is the linkage
  of the (n - k)-th merge. This is how a target ratio is met per layer with agglomerative
  clustering: the threshold is searched on the dendrogram (exactly, by reading it off), not by
  bisection. When merges tie, merge order breaks the tie, so the count is always exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MergeTree:
    """The merges of agglomerative clustering, in the order they happen.

    Attributes:
      pairs: (n - 1, 2) the cluster ids merged at each step; cluster ids 0..n-1 are the
        singletons, id n + s is the cluster made by merge s.
      linkage: (n - 1,) the average-linkage similarity of each merge (non-increasing).
    """

    pairs: np.ndarray
    linkage: np.ndarray

    @property
    def size(self) -> int:
        return len(self.linkage) + 1


def _check_similarity(similarity: np.ndarray) -> np.ndarray:
    s = np.asarray(similarity, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square matrix, got shape {s.shape}.")
    if not np.allclose(s, s.T, atol=1e-9):
        raise ValueError("similarity must be symmetric (S[i, j] == S[j, i]).")
    return s


def merge_tree(similarity: np.ndarray) -> MergeTree:
    """Average-linkage agglomerative clustering of n items: the full merge sequence.

    Args:
      similarity: (n, n) symmetric similarity matrix (higher = more alike).

    Returns:
      The `MergeTree`; O(n^3) time in NumPy, fine for the few hundred filters of a layer.
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    # Sum of pairwise similarities between active clusters, and their sizes.
    sums = s.copy()
    sizes = np.ones(n)
    active = np.ones(n, bool)
    ids = np.arange(n)
    pairs = np.zeros((max(n - 1, 0), 2), np.int64)
    linkage = np.zeros(max(n - 1, 0))
    for step in range(n - 1):
        mean = sums / np.outer(sizes, sizes)
        mean[~active, :] = -np.inf
        mean[:, ~active] = -np.inf
        np.fill_diagonal(mean, -np.inf)
        # Highest linkage; ties go to the lowest (row, column), so the result is deterministic.
        flat = int(np.argmax(mean))
        a, b = sorted(divmod(flat, n))
        pairs[step] = sorted((ids[a], ids[b]))
        linkage[step] = mean[a, b]
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        active[b] = False
        ids[a] = n + step
    return MergeTree(pairs=pairs, linkage=linkage)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumbers labels 0, 1, ... in order of first appearance."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(len(order), np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[np.unique(labels, return_inverse=True)[1]]


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


def agglomerative_by_threshold(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage clusters: merge while the linkage similarity is >= `threshold`.

    Args:
      similarity: (n, n) symmetric similarity.
      threshold: the cosine similarity two clusters need, on average, to be merged.

    Returns:
      One label per item.
    """
    tree = merge_tree(similarity)
    return cut_tree(tree, int(np.sum(tree.linkage >= threshold)))


def agglomerative_by_count(similarity: np.ndarray, clusters: int) -> tuple[np.ndarray, float]:
    """Average-linkage clusters cut at exactly `clusters` clusters.

    Args:
      similarity: (n, n) symmetric similarity.
      clusters: how many clusters (1..n).

    Returns:
      (labels, threshold): the labels and the similarity threshold that gives this cut (the
      linkage of the last merge made; +inf when no merge is made).
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, {n}], got {clusters}.")
    tree = merge_tree(s)
    merges = n - clusters
    threshold = float(tree.linkage[merges - 1]) if merges > 0 else float("inf")
    return cut_tree(tree, merges), threshold


def kmeans(
    descriptors: np.ndarray, clusters: int, *, seed: int = 0, iterations: int = 100
) -> np.ndarray:
    """Spherical k-means (cosine similarity) with k-means++ seeding.

    Rows are scaled to unit length, each is assigned to the centroid of highest cosine
    similarity, and centroids are the re-normalised means. A cluster that empties is re-seeded
    with the row least similar to its centroid.

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
