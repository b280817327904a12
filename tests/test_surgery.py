"""Surgery: masked == pruned (eval and train mode), composition, optimizer state, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_helpers import init, random_keep, rebuild
from toy_models import TOY_MODELS, ConvBNDense

from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.surgery import (
    PruneError,
    compose_keep,
    keep_to_masks,
    masks_to_keep,
    prune,
)

X = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))


def setup(name, seed=0):
    model = TOY_MODELS[name]()
    variables = init(model, X, seed)
    graph = channel_graph(model.apply, variables, X)
    return model, variables, graph


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_pruned_eval(name, seed):
    model, variables, graph = setup(name, seed)
    keep = random_keep(graph, seed)
    masked = gated_call(model.apply, graph, variables, X, keep_to_masks(graph, keep))
    pruned = prune(variables, graph, keep)
    small = rebuild(model, pruned.variables)
    chex.assert_trees_all_close(small.apply(pruned.variables, X), masked, atol=1e-5, rtol=1e-5)
    # The pruned tree is exactly what the rebuilt model expects.
    expected = jax.eval_shape(small.init, jax.random.key(0), X)
    chex.assert_trees_all_equal_shapes(expected, pruned.variables)


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_masked_equals_pruned_train(name):
    model, variables, graph = setup(name)
    keep = random_keep(graph, 7)
    kw = dict(train=True, mutable=["batch_stats"])
    masked_out, masked_stats = gated_call(
        model.apply, graph, variables, X, keep_to_masks(graph, keep), **kw
    )
    pruned = prune(variables, graph, keep)
    small = rebuild(model, pruned.variables)
    out, stats = small.apply(pruned.variables, X, **kw)
    chex.assert_trees_all_close(out, masked_out, atol=1e-5, rtol=1e-5)
    if masked_stats:
        # The surviving channels' running statistics are updated identically.
        sliced = prune({**variables, **masked_stats}, graph, keep).variables["batch_stats"]
        chex.assert_trees_all_close(stats["batch_stats"], sliced, atol=1e-5, rtol=1e-5)


def test_pruning_twice_equals_pruning_once_with_composed_keep():
    model, variables, graph = setup("residual_projection")
    first = random_keep(graph, 3)
    once = prune(variables, graph, first)
    small = rebuild(model, once.variables)
    graph2 = channel_graph(small.apply, once.variables, X)
    second = random_keep(graph2, 4)
    twice = prune(once.variables, graph2, second)
    direct = prune(variables, graph, compose_keep(first, second))
    chex.assert_trees_all_equal(twice.variables, direct.variables)
    assert twice.widths == direct.widths


@pytest.mark.slow
def test_optimizer_state_is_pruned_with_params():
    model, variables, graph = setup("conv_bn_dense")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    params = variables["params"]
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(
        lambda p: jnp.ones_like(p) * jnp.arange(p.size).reshape(p.shape), params
    )
    _, opt_state = tx.update(grads, opt_state, params)
    keep = random_keep(graph, 5)
    pruned = prune(variables, graph, keep, opt_state=opt_state, optimizer=tx)
    # The momentum of each surviving weight is the one it had before.
    momentum = pruned.opt_state[1][0].trace
    expected = prune(
        {"params": opt_state[1][0].trace, "batch_stats": variables["batch_stats"]}, graph, keep
    ).variables["params"]
    chex.assert_trees_all_equal(momentum, expected)
    # And it plugs into the optimizer for the pruned parameters.
    tx.update(jax.tree_util.tree_map(jnp.ones_like, pruned.variables["params"]), pruned.opt_state)


def test_masks_and_keep_round_trip():
    _, _, graph = setup("conv_bn_dense")
    keep = random_keep(graph, 2)
    back = masks_to_keep(keep_to_masks(graph, keep))
    assert set(back) == set(graph.names)
    for name, idx in keep.items():
        np.testing.assert_array_equal(back[name], idx)


@pytest.mark.parametrize(
    "keep, message",
    [
        ({"conv0": []}, "is empty"),
        ({"conv0": [0, 6]}, r"indices \[6\] outside 0..5"),
        ({"conv0": [-1, 2]}, "outside"),
        ({"conv0": [1, 1, 2]}, r"repeats indices \[1\]"),
        ({"conv7": [0]}, "No channel group named 'conv7'"),
        ({"head": [0, 1]}, "not prunable: its channels are the model output"),
        ({"conv0": [[0, 1]]}, "1-D array"),
    ],
)
def test_bad_keep_is_a_clear_error_and_inputs_are_untouched(keep, message):
    model, variables, graph = setup("conv_bn_dense")
    before = jax.tree_util.tree_map(np.array, variables)
    with pytest.raises(PruneError, match=message):
        prune(variables, graph, keep)
    chex.assert_trees_all_equal(before, jax.tree_util.tree_map(np.array, variables))


def test_variables_that_do_not_match_the_graph():
    model, variables, graph = setup("conv_bn_dense")
    other = ConvBNDense(widths=(("conv0", 4),))
    wrong = init(other, X)
    with pytest.raises(PruneError, match=r"shapes differ at .*params/bn0/bias \(4,\) vs \(6,\)"):
        prune(wrong, graph, {"conv1": [0]})
    missing = {"params": variables["params"]}
    with pytest.raises(PruneError, match="missing"):
        prune(missing, graph, {"conv1": [0]})


def test_opt_state_without_optimizer_is_a_clear_error():
    _, variables, graph = setup("conv_bn_dense")
    state = optax.sgd(0.1, momentum=0.9).init(variables["params"])
    with pytest.raises(PruneError, match="optimizer=tx"):
        prune(variables, graph, {"conv0": [0]}, opt_state=state)
