"""Flax NNX: graph names from module paths, a new smaller module whose attributes agree, the
optimizer's moments pruned alongside, and the module given in left untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from user_models import NnxCNN

import jaxprune as jp
from jaxprune.surgery import PruneError


@pytest.fixture()
def model():
    m = NnxCNN(rngs=nnx.Rngs(0))
    m.eval()
    return m


def inputs(n=2, seed=0):
    shape = (n, *NnxCNN.SHAPE[1:])
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_graph_names_and_widths_read_module_paths(model):
    graph = jp.nnx.channel_graph(model, inputs())
    assert graph.names == ("conv1", "conv2", "linear1")
    assert graph["conv2"].producers == ("conv2", "dw")  # the depthwise conv joins its input
    assert "linear2" in graph.fixed
    _, variables = jp.nnx.as_apply(model)
    assert set(variables) == {"params", "batch_stats"}
    assert jp.widths_from_params(variables["params"]) == {
        "conv1": 16,
        "conv2": 32,
        "dw": 32,
        "linear1": 64,
        "linear2": 10,
    }


def test_prune_returns_a_new_smaller_module_with_matching_attributes(model):
    x = inputs()
    graph = jp.nnx.channel_graph(model, x)
    keep = {"conv1": np.arange(0, 16, 2), "conv2": np.arange(20), "linear1": np.arange(10)}
    small = jp.nnx.prune(model, graph, keep)
    assert small is not model
    assert (small.conv1.out_features, small.bn1.num_features) == (8, 8)
    assert (small.conv2.in_features, small.conv2.out_features) == (8, 20)
    assert (small.dw.in_features, small.dw.out_features, small.dw.feature_group_count) == (
        20,
        20,
        20,
    )
    assert small.dw.kernel_shape == (3, 3, 1, 20)
    assert (small.linear1.in_features, small.linear1.out_features) == (6 * 6 * 20, 10)
    assert small.linear2.in_features == 10
    # The original is untouched.
    assert model.conv2.out_features == 32 and model.conv2.kernel.get_value().shape[-1] == 32
    # Masked == pruned module == pruned program, at another batch size.
    apply_fn, variables = jp.nnx.as_apply(model)
    x5 = inputs(5, seed=3)
    masked = jp.gated_call(apply_fn, graph, variables, x5, jp.keep_to_masks(graph, keep))
    np.testing.assert_allclose(small(x5), masked, atol=1e-5)
    pruned = jp.nnx.pruned_state(model, graph, keep)
    np.testing.assert_allclose(pruned.apply_fn(pruned.variables, x5), masked, atol=1e-5)
    # ... and exported, serialised and reloaded with no model code.
    exported = jax.export.export(jax.jit(pruned.apply_fn))(pruned.variables, x5)
    reloaded = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(reloaded.call(pruned.variables, x5), masked, atol=1e-5)


@pytest.mark.slow
def test_the_optimizer_state_is_pruned_and_training_continues(model):
    x = inputs()
    graph = jp.nnx.channel_graph(model, x)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss(m):
        return jnp.mean(m(x) ** 2)

    model.train()
    optimizer.update(model, nnx.grad(loss)(model))  # non-zero moments
    model.eval()
    keep = {"conv2": np.array([1, 4, 9, 30])}
    small = jp.nnx.prune(model, graph, keep)
    small_opt = jp.nnx.prune_optimizer(optimizer, graph, keep, small)
    old = nnx.to_pure_dict(nnx.state(optimizer))["opt_state"][0]
    new = nnx.to_pure_dict(nnx.state(small_opt))["opt_state"][0]
    assert small.conv2.kernel.get_value().shape[-1] == 4
    np.testing.assert_array_equal(
        new["mu"]["conv2"]["kernel"], old["mu"]["conv2"]["kernel"][..., keep["conv2"]]
    )
    np.testing.assert_array_equal(new["nu"]["dw"]["bias"], old["nu"]["dw"]["bias"][keep["conv2"]])
    np.testing.assert_array_equal(
        new["mu"]["linear1"]["kernel"],
        np.asarray(old["mu"]["linear1"]["kernel"])
        .reshape(6, 6, 32, 64)[:, :, keep["conv2"]]
        .reshape(-1, 64),
    )
    assert int(new["count"]) == int(old["count"]) == 1
    small.train()
    before = float(loss(small))
    small_opt.update(small, nnx.grad(loss)(small))
    assert float(loss(small)) != before


def test_a_module_whose_code_hard_codes_a_width_is_refused_with_the_way_out():
    class Reshapes(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.head = nnx.Linear(8 * 4 * 4, 2, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.conv(x))
            return self.head(y.reshape(y.shape[0], 4 * 4 * 8))  # a width typed into the code

    model = Reshapes(nnx.Rngs(0))
    x = jnp.ones((2, 4, 4, 3))
    graph = jp.nnx.channel_graph(model, x)
    keep = {"conv": np.arange(4)}
    with pytest.raises(PruneError, match="pruned_state"):
        jp.nnx.prune(model, graph, keep)
    pruned = jp.nnx.pruned_state(model, graph, keep)
    assert pruned.apply_fn(pruned.variables, x).shape == (2, 2)


def test_a_module_in_train_mode_prunes_and_its_statistics_are_untouched():
    m = NnxCNN(rngs=nnx.Rngs(0))  # train mode, as constructed: BatchNorm uses batch statistics
    m.bn1.mean.set_value(jnp.linspace(-0.5, 0.5, 16))
    graph = jp.nnx.channel_graph(m, inputs())
    keep = {"conv1": np.arange(1, 16, 2), "conv2": np.arange(32), "linear1": np.arange(64)}
    small = jp.nnx.prune(m, graph, keep)  # the self-check compares in inference mode
    np.testing.assert_array_equal(small.bn1.mean.get_value(), m.bn1.mean.get_value()[1::2])
    # The returned module keeps the mode it was in, and agrees with the masked model there.
    x5 = inputs(5, seed=3)
    apply_fn, variables = jp.nnx.as_apply(m)
    masked = jp.gated_call(
        apply_fn, graph, variables, x5, jp.keep_to_masks(graph, keep), train=True
    )
    np.testing.assert_allclose(small(x5), masked, atol=1e-5)
