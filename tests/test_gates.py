"""Gates: vmapped masks, chunked maps, activation gradients, masks read from variables."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import init, random_keep
from toy_models import ConvBNDense, ResidualProjection

from jaxprune.gates import (
    activations_and_gradients,
    gated_apply_fn,
    gated_call,
    map_over_masks,
    probe_shapes,
)
from jaxprune.graph import channel_graph
from jaxprune.surgery import keep_to_masks

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))


def setup(model):
    variables = init(model, X)
    return variables, channel_graph(model.apply, variables, X)


def test_all_ones_masks_change_nothing():
    model = ResidualProjection()
    variables, graph = setup(model)
    ones = {g.name: jnp.ones(g.size) for g in graph}
    chex.assert_trees_all_close(
        gated_call(model.apply, graph, variables, X, ones), model.apply(variables, X), atol=1e-6
    )


def test_vmap_and_chunked_map_over_masks_equal_a_loop():
    model = ResidualProjection()
    variables, graph = setup(model)
    candidates = [keep_to_masks(graph, random_keep(graph, s)) for s in range(6)]
    stack = jax.tree_util.tree_map(lambda *m: jnp.stack(m), *candidates)

    def loss(masks):
        return jnp.mean(gated_call(model.apply, graph, variables, X, masks) ** 2)

    looped = jnp.stack([loss(m) for m in candidates])
    vmapped = jax.jit(lambda s: map_over_masks(loss, s))(stack)
    chunked = jax.jit(lambda s: map_over_masks(loss, s, batch_size=4))(stack)
    chex.assert_trees_all_close(vmapped, looped, rtol=1e-5)
    chex.assert_trees_all_close(chunked, looped, rtol=1e-5)


@pytest.mark.slow
def test_activation_gradients_match_the_mask_derivative():
    # d loss / d mask_c = sum over gate points and positions of a * dL/da: the gradients the
    # probes return must reproduce the derivative with respect to the masks themselves.
    model = ResidualProjection()
    variables, graph = setup(model)

    def loss_fn(out):
        return jnp.sum(jax.nn.log_softmax(out)[:, 0])

    _, _, acts, grads = activations_and_gradients(model.apply, graph, variables, X, loss_fn)
    ones = {g.name: jnp.ones(g.size) for g in graph}
    mask_grads = jax.grad(lambda m: loss_fn(gated_call(model.apply, graph, variables, X, m)))(ones)
    for g in graph:
        from_probes = sum(
            jnp.sum(a * d, axis=tuple(range(a.ndim - 1)))
            for a, d in zip(acts[g.name], grads[g.name], strict=True)
        )
        chex.assert_trees_all_close(from_probes, mask_grads[g.name], rtol=1e-4, atol=1e-6)


def test_probe_gradient_is_the_activation_gradient_of_a_plain_model():
    # For a dense chain, the gradient at the hidden layer is computable by hand.
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(5, name="hidden")(x.reshape(x.shape[0], -1)))
            return nn.Dense(3, name="head")(h)

    model = MLP()
    x = X[:, :2, :2, :]
    variables = model.init(jax.random.key(0), x)
    graph = channel_graph(model.apply, variables, x)
    _, _, acts, grads = activations_and_gradients(
        model.apply, graph, variables, x, lambda out: jnp.sum(out[:, 1])
    )
    p = variables["params"]
    h = np.maximum(np.asarray(x).reshape(4, -1) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    np.testing.assert_allclose(acts["hidden"][0], h, rtol=1e-5, atol=1e-6)
    expected = np.tile(np.asarray(p["head"]["kernel"])[:, 1], (4, 1))
    np.testing.assert_allclose(grads["hidden"][0], expected, rtol=1e-6)


def test_masked_channels_get_zero_gradient_through_relu():
    # relu runs with its own derivative rule (relu'(0) = 0), not an inlined max.
    model = ConvBNDense()
    variables, graph = setup(model)
    masks = keep_to_masks(graph, {"conv1": [0, 1, 2]})
    _, _, acts, grads = activations_and_gradients(
        model.apply, graph, variables, X, lambda o: jnp.sum(o**2), masks
    )
    (act,) = acts["conv1"]
    assert float(jnp.abs(act[..., 3:]).max()) == 0.0
    shapes = probe_shapes(model.apply, graph, variables, X)
    assert shapes["conv1"][0].shape == act.shape


def test_masks_read_from_variables_without_recompiling():
    model = ConvBNDense()
    variables, graph = setup(model)
    apply = gated_apply_fn(model.apply, graph)
    traces = []

    @jax.jit
    def run(v, x):
        traces.append(1)
        return apply(v, x)

    for seed in range(3):
        masks = keep_to_masks(graph, random_keep(graph, seed))
        out = run({**variables, "masks": masks}, X)
        chex.assert_trees_all_close(out, gated_call(model.apply, graph, variables, X, masks))
    assert len(traces) == 1


def test_gates_reach_inside_jitted_submodules():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(4, (3, 3), name="conv")(x))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.jit(Inner)(name="inner")(x)
            return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))

    model = Outer()
    variables = model.init(jax.random.key(0), X)
    graph = channel_graph(model.apply, variables, X)
    assert graph.names == ("inner/conv",)
    masks = {"inner/conv": jnp.array([1.0, 0.0, 1.0, 0.0])}
    _, acts = gated_call(model.apply, graph, variables, X, masks, capture=True)
    assert float(jnp.abs(acts["inner/conv"][0][..., 1]).max()) == 0.0
