"""Activation maps, filters and per-kernel MACs of a layer, against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense, DepthwiseSeparable, TwoBranchConcat

from jaxprune.cost import count
from jaxprune.gates import gated_call
from jaxprune.graph import GraphError, channel_graph
from jaxprune.inspect import activation_maps, all_activation_maps, kernel_filters, macs_per_kernel
from jaxprune.models.random_init import random_variables
from jaxprune.surgery import prune

X = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))


class ConvReluDense(nn.Module):
    """A 3x3 SAME conv with bias, ReLU, flatten, dense: maps are easy to compute by hand."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def setup(model, x=X, seed=0):
    variables = random_variables(model, x, seed=seed)
    return variables, channel_graph(model.apply, variables, x)


def numpy_conv_relu(x, kernel, bias):
    """SAME 3x3 conv with bias, then ReLU, by explicit sums over the window."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", padded[:, i : i + h, j : j + w], kernel[i, j])
    return np.maximum(out + bias, 0.0)


def test_maps_equal_a_numpy_conv_relu():
    model = ConvReluDense()
    variables, graph = setup(model)
    maps = activation_maps(model.apply, variables, graph, "conv", X)
    params = jax.tree_util.tree_map(np.asarray, variables["params"]["conv"])
    expected = numpy_conv_relu(np.asarray(X, np.float64), params["kernel"], params["bias"])
    assert maps.shape == (3, 6, 6, 4) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-5)


def test_maps_are_read_where_consumers_read_them():
    model = ConvBNDense()
    variables, graph = setup(model, jnp.ones((2, 8, 8, 3)))
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    maps = all_activation_maps(model.apply, variables, graph, images)
    # conv0 feeds conv1 directly; conv1 is read by the dense layer after the 2x2 max pool.
    assert {k: v.shape for k, v in maps.items()} == {
        "conv0": (2, 8, 8, 6),
        "conv1": (2, 4, 4, 8),
    }
    assert np.all(maps["conv0"] >= 0) and np.all(maps["conv1"] >= 0)  # after the ReLU


def test_a_concatenated_group_and_a_globally_pooled_group():
    model = TwoBranchConcat()
    variables, graph = setup(model, jnp.ones((2, 8, 8, 3)))
    maps = all_activation_maps(model.apply, variables, graph, jnp.ones((2, 8, 8, 3)))
    assert maps["branch_b"].shape == (2, 8, 8, 3)
    model = DepthwiseSeparable()
    variables, graph = setup(model, jnp.ones((2, 8, 8, 3)))
    images = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    pooled = activation_maps(model.apply, variables, graph, "pointwise", images)
    assert pooled.shape == (2, 1, 1, 10)  # read only after the global average pool
    _, captured = gated_call(model.apply, graph, variables, images, capture=True)
    np.testing.assert_allclose(pooled[:, 0, 0], np.asarray(captured["pointwise"][0]), rtol=1e-6)


def test_dense_groups_and_bad_images_are_refused():
    model = ConvBNDense()
    variables, graph = setup(model, jnp.ones((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="dense layer.*conv0"):
        activation_maps(model.apply, variables, graph, "fc", jnp.ones((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        activation_maps(model.apply, variables, graph, "conv0", jnp.ones((8, 8, 3)))
    with pytest.raises(GraphError, match="Prunable groups"):
        activation_maps(model.apply, variables, graph, "nope", jnp.ones((2, 8, 8, 3)))


def test_filters_are_the_producers_kernel_slices():
    model = ConvBNDense()
    variables, graph = setup(model, jnp.ones((1, 8, 8, 3)))
    filters = kernel_filters(variables, graph, "conv1")
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    assert filters.shape == (8, 3, 3, 6)
    for k in range(8):
        np.testing.assert_array_equal(filters[k], kernel[..., k])
    with pytest.raises(ValueError, match="dense"):
        kernel_filters(variables, graph, "fc")


@pytest.mark.parametrize("group", ["conv0", "conv1"])
def test_macs_per_kernel_is_what_removing_kernels_saves(group):
    model = ConvBNDense()
    x = jnp.ones((1, 8, 8, 3))
    variables, graph = setup(model, x)
    per_kernel = macs_per_kernel(model.apply, variables, graph, group, x)
    keep = {group: np.arange(3, graph[group].size)}  # three kernels go
    pruned = prune(variables, graph, keep)
    small = ConvBNDense(widths=tuple(sorted(pruned.widths.items())))
    saved = count(model.apply, variables, x).macs - count(small.apply, pruned.variables, x).macs
    assert saved > 0
    assert 3 * per_kernel == pytest.approx(saved)
