"""The scripted stand-in for the person: dead kernels first, then duplicates, labelled as such."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.graph import channel_graph
from jaxprune.inspect.selection import read_selection, write_selection
from jaxprune.inspect.standin import (
    CHOSEN_BY,
    removals_from_maps,
    standin_removals,
    standin_selection,
)
from jaxprune.models.random_init import random_variables


def hand_maps(seed=0):
    """Six kernels' maps over 3 images of 4x4: kernel 2 dead, kernel 5 = 2 x kernel 1."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0.0, 1.0, (3, 4, 4, 6))
    maps[..., 2] = 0.0
    maps[..., 5] = 2.0 * maps[..., 1]
    return maps


def test_a_dead_kernel_goes_first_then_the_weaker_of_two_duplicates():
    maps = hand_maps()
    np.testing.assert_array_equal(removals_from_maps(maps, 1), [2])
    np.testing.assert_array_equal(removals_from_maps(maps, 2), [1, 2])
    three = removals_from_maps(maps, 3)
    assert len(three) == 3 and {1, 2} <= set(three.tolist())
    assert removals_from_maps(maps, 0).shape == (0,)


def test_a_nearly_dead_kernel_counts_as_dead_and_weakest_goes_first():
    maps = hand_maps()
    maps[..., 4] *= 0.01  # far below 5% of the typical peak
    maps[..., 2] = 0.001 * maps[..., 0]
    np.testing.assert_array_equal(removals_from_maps(maps, 1), [2])
    np.testing.assert_array_equal(removals_from_maps(maps, 2), [2, 4])
    np.testing.assert_array_equal(removals_from_maps(maps, 3), [1, 2, 4])
    # With no dead fraction only exact zeros are dead; kernel 2 still goes first (it is a
    # weak copy of kernel 0), then the weaker of the duplicates (1, 5) before kernel 4.
    np.testing.assert_array_equal(removals_from_maps(maps, 2, dead_fraction=0.0), [1, 2])


def test_of_a_pair_of_duplicates_one_stays():
    maps = hand_maps()
    maps[..., 2] = maps[..., 0]  # no dead kernel; two duplicate pairs: (0, 2) and (1, 5)
    # Equal twins: the later index goes; scaled twins: the weaker goes.
    np.testing.assert_array_equal(removals_from_maps(maps, 2), [1, 2])


def test_duplicates_are_judged_by_correlation_not_by_a_shared_offset():
    rng = np.random.default_rng(1)
    noise = rng.uniform(0.0, 1.0, (4, 6, 6, 4))
    maps = np.empty_like(noise)
    # Kernels 0 and 1: a large common offset, independent variations (cosine ~0.999).
    maps[..., 0] = 10.0 + noise[..., 0]
    maps[..., 1] = 10.0 + noise[..., 1]
    # Kernels 2 and 3: sparse maps that vary together (kernel 3 a noisy, weaker copy).
    pattern = np.maximum(rng.normal(size=(4, 6, 6)), 0.0)
    maps[..., 2] = pattern
    maps[..., 3] = 0.9 * pattern + 0.05 * noise[..., 3]
    vectors = maps.reshape(-1, 4).T
    cosine = vectors @ vectors.T / np.outer(*[np.linalg.norm(vectors, axis=1)] * 2)
    assert cosine[0, 1] > cosine[2, 3]  # plain cosine would remove kernel 0 or 1
    np.testing.assert_array_equal(removals_from_maps(maps, 1), [3])
    # Against NumPy's correlation: the pair that goes first is the most correlated one.
    correlation = np.corrcoef(vectors)
    np.fill_diagonal(correlation, -np.inf)
    assert set(np.unravel_index(np.argmax(correlation), correlation.shape)) == {2, 3}


def test_a_constant_map_is_not_a_duplicate():
    maps = hand_maps()
    maps[..., 2] = 0.7  # alive, constant: no correlation with anything
    maps[..., 4] = 0.6
    np.testing.assert_array_equal(removals_from_maps(maps, 1), [1])


def test_the_rule_is_deterministic():
    maps = np.random.default_rng(3).uniform(size=(2, 5, 5, 16))
    first = removals_from_maps(maps, 9)
    np.testing.assert_array_equal(first, removals_from_maps(maps.copy(), 9))
    assert len(np.unique(first)) == 9 and np.all(np.diff(first) > 0)


@pytest.mark.parametrize("count", [-1, 6, 2.0])
def test_bad_counts_are_refused(count):
    with pytest.raises(ValueError, match=r"count must be an integer in \[0, 6\)"):
        removals_from_maps(hand_maps(), count)


def test_bad_maps_and_fractions_are_refused():
    with pytest.raises(ValueError, match="num_kernels"):
        removals_from_maps(np.zeros((4, 4, 6)), 1)
    with pytest.raises(ValueError, match="dead_fraction"):
        removals_from_maps(hand_maps(), 1, dead_fraction=1.5)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


def test_on_a_model_with_a_dead_and_a_copied_kernel(tmp_path):
    model = ConvNet()
    images = jax.random.normal(jax.random.key(0), (4, 6, 6, 1))
    variables = random_variables(model, images)
    conv = variables["params"]["conv"]
    kernel, bias = np.array(conv["kernel"]), np.array(conv["bias"])
    kernel[..., 3], bias[3] = 0.0, -1.0  # never fires
    kernel[..., 4], bias[4] = kernel[..., 0], bias[0]  # the same maps as kernel 0
    bias[0] = bias[4] = 0.5  # both fire somewhere, equally
    kernel[..., 0] *= 0.5
    kernel[..., 4] *= 0.5
    conv = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    variables = {"params": {**variables["params"], "conv": conv}}
    graph = channel_graph(model.apply, variables, images)
    np.testing.assert_array_equal(
        standin_removals(model.apply, variables, graph, "conv", images, 2), [3, 4]
    )
    document = standin_selection(model.apply, variables, graph, "conv", images, 2)
    assert document["chosen_by"] == CHOSEN_BY and CHOSEN_BY.startswith("stand-in:")
    layers = read_selection(write_selection(tmp_path / "standin.json", document))
    assert layers["conv"]["num_kernels"] == 6
    np.testing.assert_array_equal(layers["conv"]["remove"], [3, 4])


def test_a_progressive_run_reads_the_same_maps_and_rule_as_the_page():
    from jaxprune.inspect.maps import activation_maps
    from jaxprune.methods import standin as method_standin

    model = ConvNet()
    images = jax.random.normal(jax.random.key(1), (3, 6, 6, 1))
    variables = random_variables(model, images)
    graph = channel_graph(model.apply, variables, images)
    np.testing.assert_allclose(
        method_standin.layer_maps(model.apply, variables, graph, "conv", images),
        activation_maps(model.apply, variables, graph, "conv", images),
        rtol=1e-6,
    )
    assert method_standin.removals_from_maps is removals_from_maps
    assert method_standin.CHOSEN_BY == CHOSEN_BY
