"""Criteria clustering of the blending method: rank similarities, agglomeration, medoids."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from jaxprune.methods.blending_clusters import (
    ClusterConfig,
    agglomerate,
    cluster_layer,
    kendall_tau,
    representative,
    similarity_matrix,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size=40).astype(float)  # many ties
    b = a + rng.normal(0, 2, size=40)
    b[:5] = b[0]
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)


def test_similarity_matrix_matches_scipy_and_zeroes_constant_criteria():
    rng = np.random.default_rng(3)
    scores = [rng.normal(size=30) for _ in range(3)] + [np.ones(30)]
    spearman = similarity_matrix(scores, "spearman")
    kendall = similarity_matrix(scores, "kendall")
    for i in range(3):
        for j in range(3):
            if i != j:
                rho = stats.spearmanr(scores[i], scores[j]).statistic
                tau = stats.kendalltau(scores[i], scores[j]).statistic
                assert spearman[i, j] == pytest.approx(rho, abs=1e-12)
                assert kendall[i, j] == pytest.approx(tau, abs=1e-12)
    np.testing.assert_array_equal(np.diag(spearman), 1.0)
    np.testing.assert_array_equal(spearman[3, :3], 0.0)
    np.testing.assert_array_equal(spearman, spearman.T)


BLOCKS = np.array(
    [
        [1.0, 0.9, 0.8, 0.1, 0.0],
        [0.9, 1.0, 0.85, 0.2, 0.1],
        [0.8, 0.85, 1.0, 0.0, 0.2],
        [0.1, 0.2, 0.0, 1.0, 0.75],
        [0.0, 0.1, 0.2, 0.75, 1.0],
    ]
)


def test_threshold_clustering_finds_the_blocks_and_count_clustering_merges_further():
    assert agglomerate(BLOCKS, ClusterConfig(threshold=0.7)) == [[0, 1, 2], [3, 4]]
    assert agglomerate(BLOCKS, ClusterConfig(threshold=0.95)) == [[0], [1], [2], [3], [4]]
    # 0.76 stops before {3, 4} (0.75) but after {0, 1, 2} (average 0.85).
    assert agglomerate(BLOCKS, ClusterConfig(threshold=0.76)) == [[0, 1, 2], [3], [4]]
    assert agglomerate(BLOCKS, ClusterConfig(num_clusters=1)) == [[0, 1, 2, 3, 4]]
    assert agglomerate(BLOCKS, ClusterConfig(num_clusters=4)) == [[0, 1], [2], [3], [4]]
    # Complete linkage: {0,1} and 2 are 0.8 apart at worst, so 0.82 keeps 2 alone.
    complete = ClusterConfig(threshold=0.82, linkage="complete")
    assert agglomerate(BLOCKS, complete) == [[0, 1], [2], [3], [4]]


def test_single_linkage_chains_what_average_linkage_keeps_apart():
    chain = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.8], [0.0, 0.8, 1.0]])
    assert agglomerate(chain, ClusterConfig(threshold=0.7, linkage="single")) == [[0, 1, 2]]
    # Average: {0, 1} vs 2 is (0.0 + 0.8) / 2 = 0.4 < 0.7.
    assert agglomerate(chain, ClusterConfig(threshold=0.7)) == [[0, 1], [2]]


def test_kendall_clustering_of_a_layer_uses_tau():
    rng = np.random.default_rng(1)
    base = rng.normal(size=12)
    pool = {"a": {"g": base}, "b": {"g": base + 0.3 * rng.normal(size=12)}, "c": {"g": -base}}
    layer = cluster_layer("g", pool, ClusterConfig(similarity="kendall", threshold=0.5))
    tau = stats.kendalltau(pool["a"]["g"], pool["b"]["g"]).statistic
    assert layer.similarity[0, 1] == pytest.approx(tau, abs=1e-12) and tau > 0.5
    assert layer.clusters == (("a", "b"), ("c",))


def test_medoid_is_the_member_most_similar_to_its_cluster():
    assert representative([0, 1, 2], BLOCKS, "medoid") == 1  # mean 0.917 vs 0.9 and 0.883
    assert representative([0, 1, 2], BLOCKS, "first") == 0
    assert representative([3, 4], BLOCKS, "medoid") == 3  # a tie goes to the lower index


def test_cluster_layer_skips_criteria_without_the_group_and_names_members():
    rng = np.random.default_rng(0)
    base = rng.normal(size=20)
    pool = {
        "a": {"conv": base, "fc": base},
        "b": {"conv": base * 2 + 0.01 * rng.normal(size=20)},
        "c": {"conv": -base},
        "d": {"fc": rng.normal(size=20)},
    }
    layer = cluster_layer("conv", pool, ClusterConfig(threshold=0.7))
    assert layer.criteria == ("a", "b", "c")
    assert layer.clusters == (("a", "b"), ("c",))
    assert layer.representatives == ("a", "c")
    assert layer.similarity[0, 2] == pytest.approx(-1.0)
    assert layer.to_dict()["clusters"] == [["a", "b"], ["c"]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="similarity must be one of"):
        cluster_layer("g", {"a": {"g": np.arange(3.0)}}, ClusterConfig(similarity="pearson"))
    with pytest.raises(ValueError, match="No criterion of the pool scores group"):
        cluster_layer("g", {"a": {"h": np.arange(3.0)}}, ClusterConfig())
    with pytest.raises(ValueError, match="non-finite"):
        cluster_layer("g", {"a": {"g": np.array([0.0, -np.inf, 1.0])}}, ClusterConfig())
    with pytest.raises(ValueError, match="num_clusters"):
        agglomerate(BLOCKS, ClusterConfig(num_clusters=-1))
    with pytest.raises(ValueError, match="threshold is a correlation"):
        agglomerate(BLOCKS, ClusterConfig(threshold=1.5))
    with pytest.raises(ValueError, match="representative must be one of"):
        cluster_layer("g", {"a": {"g": np.arange(3.0)}}, ClusterConfig(representative="mean"))
