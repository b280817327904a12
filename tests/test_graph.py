"""The channel graph found in the jaxpr: groups, members, fixed channels, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense, DepthwiseSeparable, ResidualProjection, TwoBranchConcat

from jaxprune.graph import GraphError, channel_graph


def graph_of(model, shape=(2, 8, 8, 3), **kw):
    x = jnp.zeros(shape)
    variables = model.init(jax.random.key(0), x)
    return channel_graph(model.apply, variables, x, **kw), variables


def members(group):
    return {("/".join(m.path), m.axis) for m in group.members}


def test_plain_chain_groups_and_members():
    graph, _ = graph_of(ConvBNDense())
    assert graph.names == ("conv0", "conv1", "fc")
    assert graph.sizes == {"conv0": 6, "conv1": 8, "fc": 12}
    assert members(graph["conv0"]) == {
        ("params/conv0/kernel", 3),
        ("params/bn0/scale", 0),
        ("params/bn0/bias", 0),
        ("batch_stats/bn0/mean", 0),
        ("batch_stats/bn0/var", 0),
        ("params/conv1/kernel", 2),
    }
    assert graph["conv0"].kind == "conv" and graph["fc"].kind == "dense"
    assert graph["conv1"].consumers == ("fc",)
    assert "head" in graph.fixed and "output" in graph.fixed["head"]


def test_flatten_rows_follow_hwc_order():
    graph, variables = graph_of(ConvBNDense())
    (rows,) = [m for m in graph["conv1"].members if m.path == ("params", "fc", "kernel")]
    assert rows.axis == 0
    # After a 2x2 pool of 8x8: 4x4 positions, 8 channels; row (h * 4 + w) * 8 + c is channel c.
    np.testing.assert_array_equal(rows.channel_of_index, np.tile(np.arange(8), 16))
    assert variables["params"]["fc"]["kernel"].shape[0] == 128


def test_depthwise_joins_its_input_group():
    graph, _ = graph_of(DepthwiseSeparable())
    assert graph.names == ("stem", "pointwise")
    stem = graph["stem"]
    assert set(stem.producers) == {"stem", "depthwise"}
    assert ("params/depthwise/kernel", 3) in members(stem)
    assert ("params/depthwise/kernel", 2) not in members(stem)  # size 1: one input per output
    assert ("params/pointwise/kernel", 2) in members(stem)


def test_concatenation_offsets_channels():
    graph, _ = graph_of(TwoBranchConcat())
    (mix_in,) = [m for m in graph["branch_b"].members if m.path == ("params", "mix", "kernel")]
    np.testing.assert_array_equal(mix_in.channel_of_index, [-1] * 5 + [0, 1, 2])
    (mix_in_a,) = [m for m in graph["branch_a"].members if m.path == ("params", "mix", "kernel")]
    np.testing.assert_array_equal(mix_in_a.channel_of_index, [0, 1, 2, 3, 4, -1, -1, -1])
    (head_rows,) = [m for m in graph["mix"].members if m.path == ("params", "head", "kernel")]
    # 4x4 positions of [a(5), b(3), mix(6)] = 14 channels each.
    assert head_rows.channel_of_index.shape == (16 * 14,)
    assert (head_rows.channel_of_index[:14] == [-1] * 8 + list(range(6))).all()


def test_residual_add_unions_its_producers():
    graph, _ = graph_of(ResidualProjection())
    assert graph.names == ("stem", "b1_conv1", "b1_conv2", "b2_conv1")
    res = graph["b1_conv2"]
    assert set(res.producers) == {"b1_conv2", "b1_shortcut", "b2_conv2"}
    assert {("params/head/kernel", 0), ("params/b2_conv1/kernel", 2)} <= members(res)
    assert set(graph["stem"].consumers) == {"b1_conv1", "b1_shortcut"}


def test_train_mode_graph_equals_eval_mode_graph():
    model = ResidualProjection()
    g_eval, variables = graph_of(model)
    g_train = channel_graph(
        model.apply, variables, jnp.zeros((2, 8, 8, 3)), train=True, mutable=["batch_stats"]
    )
    assert g_eval.sizes == g_train.sizes
    for a, b in zip(g_eval.groups, g_train.groups, strict=True):
        assert set(a.members) == set(b.members)


def test_model_input_channels_are_not_prunable():
    class InputResidual(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jnp.mean(x + nn.Conv(3, (1, 1))(x), axis=(1, 2)))

    graph, _ = graph_of(InputResidual())
    assert len(graph) == 0
    assert "input" in graph.fixed["Conv_0"]


def test_unsupported_op_on_channels_is_a_clear_error():
    class Sorts(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.sort(nn.Conv(4, (3, 3), name="conv")(x), axis=-1)
            return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))

    with pytest.raises(GraphError, match=r"produced by \['conv'\].*'sort'"):
        graph_of(Sorts())
    graph, _ = graph_of(Sorts(), strict=False)
    assert len(graph) == 0 and "conv" in graph.fixed


def test_grouped_convolution_is_refused_by_name():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), name="a")(x))
            x = nn.Conv(8, (3, 3), feature_group_count=2, name="g")(x)
            return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))

    with pytest.raises(GraphError, match="feature_group_count=2"):
        graph_of(Grouped())


def test_unknown_group_and_logits_are_clear_errors():
    graph, _ = graph_of(ConvBNDense())
    with pytest.raises(GraphError, match="No channel group named 'conv9'"):
        graph["conv9"]
    with pytest.raises(GraphError, match="not prunable"):
        graph["head"]
