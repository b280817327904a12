"""The one clustering (`jaxprune.methods.clustering`): the same partitions as the two clusterings
it replaced (blending's criteria agglomeration and functional's filter dendrogram, kept below as
references), ties and thresholds included, and scipy's merge heights where nothing ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from jaxprune.methods import clustering
from jaxprune.methods.blending_clusters import ClusterConfig, agglomerate

# ---------------------------------------------------------------------------------------------
# The replaced implementations, as they were (references only).


def old_filter_merges(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Functional's former average-linkage dendrogram: (pairs, linkage)."""
    s = np.asarray(similarity, np.float64)
    n = s.shape[0]
    sums, sizes, active, ids = s.copy(), np.ones(n), np.ones(n, bool), np.arange(n)
    pairs, linkage = np.zeros((n - 1, 2), np.int64), np.zeros(n - 1)
    for step in range(n - 1):
        mean = sums / np.outer(sizes, sizes)
        mean[~active, :] = -np.inf
        mean[:, ~active] = -np.inf
        np.fill_diagonal(mean, -np.inf)
        a, b = sorted(divmod(int(np.argmax(mean)), n))
        pairs[step], linkage[step] = sorted((ids[a], ids[b])), mean[a, b]
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        active[b] = False
        ids[a] = n + step
    return pairs, linkage


def old_filter_cut(similarity: np.ndarray, *, threshold=None, clusters=None) -> np.ndarray:
    """Functional's former cut: by threshold (merges with linkage >= it) or by count."""
    pairs, linkage = old_filter_merges(similarity)
    n = len(similarity)
    merges = int(np.sum(linkage >= threshold)) if clusters is None else n - clusters
    tree = clustering.MergeTree(pairs=pairs, linkage=linkage)
    return clustering.cut_tree(tree, merges)


def old_criteria_clusters(similarity: np.ndarray, threshold: float, linkage: str, count: int):
    """Blending's former agglomeration: lists of members, ordered by their first."""
    n = similarity.shape[0]
    clusters = [[i] for i in range(n)]
    reduce = {"average": np.mean, "complete": np.min, "single": np.max}[linkage]
    target = min(count, n) if count else 1
    while len(clusters) > target:
        best, pair = -math.inf, (0, 1)
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                value = float(reduce(similarity[np.ix_(clusters[i], clusters[j])]))
                if value > best:
                    best, pair = value, (i, j)
        if not count and best < threshold:
            break
        i, j = pair
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return sorted(clusters, key=lambda c: c[0])


# ---------------------------------------------------------------------------------------------
# Fixed inputs


def random_similarity(seed: int, n: int, quantum: float | None = None) -> np.ndarray:
    """A symmetric matrix in [-1, 1]; with `quantum` (a power of two) its entries are multiples
    of it, so many pairs tie and every mean is exact in binary."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.0, 1.0, (n, n))
    if quantum is not None:
        a = np.round(a / quantum) * quantum
    s = np.triu(a, 1)
    s = s + s.T
    np.fill_diagonal(s, 1.0)
    return s


def cosine(descriptors: np.ndarray) -> np.ndarray:
    unit = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    s = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(s, 1.0)
    return s


def structured_similarities() -> list[np.ndarray]:
    """What the methods meet: duplicate filters (cosine 1), silent filters (-1 to all), and
    criteria with constant scores (0 to all) among real ones."""
    found = []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        n = int(rng.integers(5, 14))
        descriptors = rng.normal(size=(n, 6))
        for i, j in rng.integers(0, n, (3, 2)):
            descriptors[j] = descriptors[i]
        s = cosine(descriptors)
        found.append(s)
        silent = rng.random(n) < 0.35
        silenced = s.copy()
        silenced[silent, :] = -1.0
        silenced[:, silent] = -1.0
        np.fill_diagonal(silenced, 1.0)
        found.append(silenced)
        scores = [rng.normal(size=24) for _ in range(int(rng.integers(4, 10)))]
        scores[0] = np.ones(24)
        scores[-1] = np.full(24, 2.0)
        scores[1] = 3.0 * scores[2]
        found.append(clustering.rank_similarity(scores))
    return found


def partition(labels: np.ndarray) -> list[list[int]]:
    return clustering.members(labels)


FIXED = (
    [random_similarity(seed, int(3 + seed % 11)) for seed in range(40)]
    + [random_similarity(seed, int(3 + seed % 11), 0.25) for seed in range(40)]
    + [random_similarity(seed, int(3 + seed % 11), 0.5) for seed in range(20)]
    + structured_similarities()
)
THRESHOLDS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.7, 0.75, 1.0)


@pytest.mark.parametrize("index", range(len(FIXED)))
def test_filter_clusters_equal_the_former_dendrogram_cuts(index):
    s = FIXED[index]
    n = len(s)
    for k in range(1, n + 1):
        labels, threshold = clustering.agglomerative_by_count(s, k)
        assert partition(labels) == partition(old_filter_cut(s, clusters=k)), k
        _, old_linkage = old_filter_merges(s)
        expected = old_linkage[n - k - 1] if k < n else math.inf
        assert threshold == pytest.approx(expected, abs=1e-12)
    for t in THRESHOLDS:
        got = clustering.agglomerative_by_threshold(s, t)
        assert partition(got) == partition(old_filter_cut(s, threshold=t)), t


@pytest.mark.parametrize("linkage", clustering.LINKAGES)
@pytest.mark.parametrize("index", range(0, len(FIXED), 3))
def test_criteria_clusters_equal_the_former_agglomeration(index, linkage):
    s = FIXED[index]
    for t in THRESHOLDS:
        config = ClusterConfig(threshold=t, linkage=linkage)
        assert agglomerate(s, config) == old_criteria_clusters(s, t, linkage, 0), t
    for k in range(1, len(s) + 2):
        config = ClusterConfig(num_clusters=k, linkage=linkage)
        assert agglomerate(s, config) == old_criteria_clusters(s, 0.7, linkage, k), k


def test_ties_merge_the_pair_with_the_lowest_first_members():
    # 0-1 and 1-2 are equally similar, 0-2 not at all: 0 and 1 merge, 2 stays alone.
    chain = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.9], [0.0, 0.9, 1.0]])
    assert partition(clustering.agglomerative_by_threshold(chain, 0.5)) == [[0, 1], [2]]
    # Three identical filters and an identical pair: a cut after two merges takes the lowest.
    same = np.ones((5, 5))
    same[:3, 3:] = same[3:, :3] = 0.2
    labels, threshold = clustering.agglomerative_by_count(same, 3)
    assert partition(labels) == [[0, 1, 2], [3], [4]] and threshold == 1.0
    # Silent filters (-1 to everything) merge last, lowest first.
    silent = np.full((4, 4), -1.0)
    np.fill_diagonal(silent, 1.0)
    labels, _ = clustering.agglomerative_by_count(silent, 3)
    assert partition(labels) == [[0, 1], [2], [3]]


@pytest.mark.parametrize("linkage", clustering.LINKAGES)
@pytest.mark.parametrize("seed", range(5))
def test_without_ties_the_merges_are_scipys(seed, linkage):
    s = random_similarity(seed, 12)
    tree = clustering.merge_tree(s, linkage)
    distance = 1.0 - s
    np.fill_diagonal(distance, 0.0)
    z = hierarchy.linkage(squareform(distance, checks=False), method=linkage)
    np.testing.assert_array_equal(tree.pairs, np.sort(z[:, :2].astype(np.int64), axis=1))
    np.testing.assert_allclose(tree.linkage, 1.0 - z[:, 2], atol=1e-12)
    assert np.all(np.diff(tree.linkage) <= 1e-12)  # monotone


def test_rank_correlations_are_scipys_and_constant_vectors_rank_nothing():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 30).astype(float)  # ties
    b = a + rng.normal(0, 1.5, 30)
    assert clustering.rank_correlation(a, b, "spearman") == pytest.approx(
        stats.spearmanr(a, b).statistic, abs=1e-15
    )
    assert clustering.rank_correlation(a, b, "kendall") == pytest.approx(
        stats.kendalltau(a, b).statistic, abs=1e-15
    )
    assert math.isnan(clustering.rank_correlation(a, np.ones(30)))  # and no warning
    matrix = clustering.rank_similarity([a, b, np.ones(30)], "kendall")
    np.testing.assert_array_equal(matrix[2], [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        clustering.rank_correlation(a, b[:3])
    with pytest.raises(ValueError, match="NaN"):
        clustering.rank_correlation(a, np.full(30, np.nan))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="linkage must be one of"):
        clustering.merge_tree(np.eye(3), "ward")
    with pytest.raises(ValueError, match="symmetric"):
        clustering.merge_tree(np.array([[1.0, 0.2], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="finite"):
        clustering.merge_tree(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="clusters must be in"):
        clustering.agglomerative_by_count(np.eye(3), 4)
    tree = clustering.merge_tree(np.ones((1, 1)))
    assert tree.size == 1 and clustering.cut_tree(tree, 0).tolist() == [0]
