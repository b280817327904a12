"""One-shot selection: per-layer and global ranking, scope, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune.graph import channel_graph
from jaxprune.methods.oneshot import OneShotConfig, keep_from_scores, select_groups


@pytest.fixture(scope="module")
def graph():
    model = ConvBNDense()
    x = jnp.zeros((1, 8, 8, 3))
    return channel_graph(model.apply, model.init(jax.random.key(0), x), x)


def test_per_layer_keeps_the_top_scores_of_each_conv_group(graph):
    scores = {"conv0": np.array([5, 1, 4, 0, 3, 2.0]), "conv1": np.arange(8.0), "fc": np.ones(12)}
    keep = keep_from_scores(graph, scores, OneShotConfig(ratio=0.5))
    np.testing.assert_array_equal(keep["conv0"], [0, 2, 4])
    np.testing.assert_array_equal(keep["conv1"], [4, 5, 6, 7])
    assert "fc" not in keep  # scope "conv" leaves dense layers alone
    assert select_groups(graph, "all") == ["conv0", "conv1", "fc"]


def test_global_ranking_removes_the_lowest_overall_and_keeps_min_channels(graph):
    scores = {"conv0": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), "conv1": np.full(8, 10.0)}
    keep = keep_from_scores(
        graph, scores, OneShotConfig(ratio=0.5, ranking="global", min_channels=2)
    )
    # 7 of 14 go: the lowest are conv0's, but conv0 keeps at least 2, so 3 come from conv1.
    np.testing.assert_array_equal(keep["conv0"], [4, 5])
    np.testing.assert_array_equal(keep["conv1"], [3, 4, 5, 6, 7])


def test_bad_input(graph):
    with pytest.raises(ValueError, match="ratio"):
        keep_from_scores(graph, {}, OneShotConfig(ratio=1.0))
    with pytest.raises(ValueError, match="has shape"):
        keep_from_scores(graph, {"conv0": np.ones(3)}, OneShotConfig())
    with pytest.raises(ValueError, match="scope"):
        select_groups(graph, "everything")


@pytest.mark.slow
def test_a_group_normalised_in_blocks_loses_whole_blocks():
    from user_models import GroupNormNet, init_linen

    model, variables, x, _ = init_linen(GroupNormNet)
    graph = channel_graph(model.apply, variables, x)
    # Block sums of Conv_0 (4 blocks of 4): 10, 2, 7, 1 -> keep blocks 0 and 2.
    scores = {"Conv_0": np.repeat([2.5, 0.5, 1.75, 0.25], 4), "Conv_1": np.arange(24.0)}
    keep = keep_from_scores(graph, scores, OneShotConfig(ratio=0.5))
    np.testing.assert_array_equal(keep["Conv_0"], np.r_[0:4, 8:12])
    np.testing.assert_array_equal(keep["Conv_1"], np.r_[12:24])
