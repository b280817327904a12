"""The oracle equals a brute-force loop and the pruned model's loss, and adds up over batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_helpers import init, rebuild
from toy_models import ConvBNDense, ResidualProjection

from jaxprune.criteria import ScoringContext, loss_after_removal, score
from jaxprune.criteria.removal import delta_sites
from jaxprune.gates import gate_points, gated_call
from jaxprune.graph import GraphError, channel_graph
from jaxprune.surgery import prune
from jaxprune.trace import trace_apply

X = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
Y = np.array([0, 1, 2, 0, 1, 2], np.int32)
BATCH = {"image": X, "label": Y}


class PoolThenConv(nn.Module):
    """conv-relu, max pool, conv-relu, global average pool, dense: a gate read after pooling."""

    widths: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = dict(self.widths)
        x = nn.max_pool(nn.relu(nn.Conv(w.get("a", 5), (3, 3), name="a")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(w.get("b", 4), (3, 3), name="b")(x))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def setup(model):
    variables = init(model, X)
    return variables, ScoringContext(model.apply, channel_graph(model.apply, variables, X))


def brute_force(context, variables, masks, x=X, y=Y):
    """Loss change of each channel removed alone: one full masked forward per channel."""

    @jax.jit
    def loss(m):
        out = gated_call(context.apply_fn, context.graph, variables, x, m)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))

    full = {g.name: jnp.ones(g.size) for g in context.graph}
    full.update({k: jnp.asarray(v) for k, v in masks.items()})
    base = float(loss(full))
    changes = {}
    for group in context.graph:
        values = []
        for c in range(group.size):
            values.append(float(loss({**full, group.name: full[group.name].at[c].set(0.0)})) - base)
        changes[group.name] = np.array(values)
    return changes


@pytest.fixture(scope="module", params=[ConvBNDense, ResidualProjection, PoolThenConv])
def model_setup(request):
    return setup(request.param())


@pytest.mark.slow
def test_oracle_equals_a_brute_force_loop(model_setup):
    variables, context = model_setup
    first = context.graph.groups[0]
    masks = {first.name: np.ones(first.size, np.float32)}
    masks[first.name][1] = 0  # one channel already removed: the surviving model is scored
    want = brute_force(context, variables, masks)
    for mode in ("auto", "mask"):
        got = score("oracle_loss", context, variables, BATCH, masks=masks, mode=mode)
        for group, values in want.items():
            expected = values.copy()
            if group == first.name:
                assert got[group][1] == -np.inf
                expected[1] = got[group][1]
            np.testing.assert_allclose(got[group], expected, atol=2e-6, err_msg=f"{mode} {group}")


@pytest.mark.slow
def test_the_delta_path_is_used_where_it_applies_and_refused_elsewhere():
    expectations = {
        ConvBNDense: {"conv0": 1, "conv1": 0, "fc": 0},
        ResidualProjection: {"stem": 2, "b1_conv1": 1, "b1_conv2": 0, "b2_conv1": 1},
        PoolThenConv: {"a": 1, "b": 0},
    }
    for cls, sites in expectations.items():
        variables, context = setup(cls())
        program = trace_apply(context.apply_fn, variables, X)
        points = gate_points(context.apply_fn, context.graph, variables, X)
        for group, count in sites.items():
            size = context.graph[group].size
            assert len(delta_sites(program, points[group], size)) == count, (cls, group)
    variables, context = setup(ResidualProjection())
    with pytest.raises(ValueError, match="deltas"):
        loss_after_removal(context, variables, BATCH, "b1_conv2", mode="delta")
    # Where it applies, delta and mask agree.
    delta = loss_after_removal(context, variables, BATCH, "stem", mode="delta")
    mask = loss_after_removal(context, variables, BATCH, "stem", mode="mask")
    np.testing.assert_allclose(delta.removed, mask.removed, rtol=1e-5)


@pytest.mark.slow
def test_removing_one_channel_equals_the_loss_of_the_pruned_model():
    model = ConvBNDense()
    variables, context = setup(model)
    scores = score("oracle_loss", context, variables, BATCH)
    for group, c in (("conv0", 2), ("conv1", 5), ("fc", 7)):
        size = context.graph[group].size
        pruned = prune(variables, context.graph, {group: [i for i in range(size) if i != c]})
        small = rebuild(model, pruned.variables)
        out = small.apply(pruned.variables, X)
        pruned_loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, Y)))
        base = float(
            jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, X), Y))
        )
        np.testing.assert_allclose(base + scores[group][c], pruned_loss, atol=2e-6)


@pytest.mark.slow
def test_oracle_accumulates_over_batches_and_abs_is_its_magnitude():
    variables, context = setup(ConvBNDense())
    whole = score("oracle_loss", context, variables, BATCH)
    split = score(
        "oracle_loss",
        context,
        variables,
        [{"image": X[:2], "label": Y[:2]}, {"image": X[2:], "label": Y[2:]}],
        batch_size=4,
    )
    absolute = score("oracle_abs", context, variables, BATCH)
    for group in whole:
        np.testing.assert_allclose(split[group], whole[group], atol=1e-6)
        np.testing.assert_allclose(absolute[group], np.abs(whole[group]), atol=1e-7)
    assert any((whole[g] < 0).any() for g in whole)  # the signed oracle keeps its sign


def test_loss_after_removal_for_one_group():
    variables, context = setup(ConvBNDense())
    result = loss_after_removal(context, variables, BATCH, "conv1", batch_size=3)
    logits = context.apply_fn(variables, X)
    base = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, Y))
    np.testing.assert_allclose(result.loss, float(base), rtol=1e-6)
    assert result.removed.shape == (8,)
    only = score("oracle_loss", context, variables, BATCH, groups=["conv1"])
    assert set(only) == {"conv1"}
    np.testing.assert_allclose(only["conv1"], result.removed - result.loss, atol=1e-6)
    with pytest.raises(GraphError, match="conv9"):
        loss_after_removal(context, variables, BATCH, "conv9")
    with pytest.raises(ValueError, match="batch_size"):
        loss_after_removal(context, variables, BATCH, "conv1", batch_size=0)
