"""The pruned program on models written in many styles: masked == pruned == exported.

Every model of `user_models` hard-codes its widths; none could be rebuilt from a width spec.
For each, half of every group's channels (whole blocks for GroupNorm) are removed, and the
masked model, the pruned program at another batch size, and the pruned program exported with
`jax.export`, serialised and reloaded must agree.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from user_models import (
    LINEN_MODELS,
    ChannelConstants,
    FeaturesOut,
    GroupNormNet,
    ShapeBranchResNet,
    TinyConvNeXt,
    WeightStandardised,
    close,
    half_keep,
    init_linen,
)

import jaxprune as jp
from jaxprune.graph import GraphError
from jaxprune.surgery import PruneError, check_against_masks


def batch(model_cls, n, seed=5):
    shape = (n, *model_cls.SHAPE[1:])
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# Three styles in the default tier (hard-coded widths with nn.compact and with setup, a
# closed-over constant), every style in the slow one.
DEFAULT_TIER_STYLES = ("CompactHardCoded", "SetupHardCoded", "NormalisedInputVGG")


@pytest.mark.parametrize(
    "model_cls",
    [
        m if m.__name__ in DEFAULT_TIER_STYLES else pytest.param(m, marks=pytest.mark.slow)
        for m in LINEN_MODELS
    ],
    ids=lambda c: c.__name__,
)
def test_masked_equals_pruned_equals_exported(model_cls):
    model, variables, x, kwargs = init_linen(model_cls)
    graph = jp.channel_graph(model.apply, variables, x, **kwargs)
    assert len(graph) >= 2, graph.summary()
    assert all(g.members for g in graph.groups)
    keep = half_keep(graph)
    pruned = jp.prune(variables, graph, keep)  # verify=True: checked once at the example
    x5 = batch(model_cls, 5)
    masked = jp.gated_call(
        model.apply, graph, variables, x5, jp.keep_to_masks(graph, keep), **kwargs
    )
    small = pruned.apply_fn(pruned.variables, x5, **kwargs)
    close(masked, small)
    # Pruning changed the model: the unpruned output is another one.
    full = model.apply(variables, x5, **kwargs)
    assert (
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(
                jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(small), strict=True
            )
        )
        > 1e-3
    )
    # Exported with no model source, serialised, reloaded.
    fn = jax.jit(lambda v, inp: pruned.apply_fn(v, inp, **kwargs))
    exported = jax.export.export(fn)(
        jax.tree_util.tree_map(jax.ShapeDtypeStruct.from_array, pruned.variables)
        if hasattr(jax.ShapeDtypeStruct, "from_array")
        else jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pruned.variables
        ),
        jax.ShapeDtypeStruct(x5.shape, x5.dtype),
    )
    reloaded = jax.export.deserialize(exported.serialize())
    close(masked, reloaded.call(pruned.variables, x5))


@pytest.mark.slow
def test_the_pruned_program_jits_differentiates_and_vmaps():
    model, variables, x, kwargs = init_linen(ShapeBranchResNet)
    graph = jp.channel_graph(model.apply, variables, x)
    pruned = jp.prune(variables, graph, half_keep(graph))
    x4 = batch(ShapeBranchResNet, 4)
    eager = pruned.apply_fn(pruned.variables, x4)
    close(eager, jax.jit(pruned.apply_fn)(pruned.variables, x4))
    # vmap over single examples equals the batched call.
    per_example = jax.vmap(lambda xi: pruned.apply_fn(pruned.variables, xi[None])[0])(x4)
    close(eager, per_example)
    # The gradient through the pruned program equals the masked model's on kept parameters.

    def loss(v, apply):
        return jnp.mean(apply(v, x4) ** 2)

    grads = jax.grad(loss)(pruned.variables, pruned.apply_fn)
    masks = jp.keep_to_masks(graph, pruned.keep)
    masked_grads = jax.grad(loss)(
        variables, lambda v, inp: jp.gated_call(model.apply, graph, v, inp, masks)
    )
    sliced = jp.prune(masked_grads, graph, pruned.keep, verify=False).variables
    close(sliced["params"], grads["params"], rtol=1e-4)


@pytest.mark.slow
def test_one_optax_step_on_the_pruned_program_with_pruned_momentum():
    model, variables, x, kwargs = init_linen(FeaturesOut)
    graph = jp.channel_graph(model.apply, variables, x)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])
    opt_state = jax.tree_util.tree_map(lambda a: a + 1.0, opt_state)  # non-zero momenta
    keep = half_keep(graph)
    pruned = jp.prune(variables, graph, keep, opt_state=opt_state, optimizer=tx)
    params = pruned.variables["params"]

    def loss(p):
        logits, _ = pruned.apply_fn({"params": p}, x)
        return jnp.mean(logits**2)

    updates, _ = tx.update(jax.grad(loss)(params), pruned.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    chex_shapes = jax.tree_util.tree_map(jnp.shape, new_params)
    assert chex_shapes == jax.tree_util.tree_map(jnp.shape, params)
    assert float(loss(new_params)) != float(loss(params))


def test_a_shape_dependent_branch_keeps_its_traced_path():
    """When the kept widths make the shortcut's shape equal the block's output, re-running the
    code would skip the projection; the pruned program keeps it, and a rebuild is refused."""
    model, variables, x, _ = init_linen(ShapeBranchResNet)
    graph = jp.channel_graph(model.apply, variables, x)
    # Block 1 projects 16 -> 32 channels at stride 1; keep 16 of its 32 so both sides have 16.
    keep = {"BottleneckBlock_1/Conv_2": np.arange(16)}
    pruned = jp.prune(variables, graph, keep)
    masked = jp.gated_call(model.apply, graph, variables, x, jp.keep_to_masks(graph, keep))
    close(masked, pruned.apply_fn(pruned.variables, x))
    with pytest.raises(PruneError, match="another path"):
        jp.rebuild_linen(model, pruned)


@pytest.mark.slow
def test_a_rebuilt_linen_module_needs_no_source_edit():
    model, variables, x, _ = init_linen(GroupNormNet)
    graph = jp.channel_graph(model.apply, variables, x)
    pruned = jp.prune(variables, graph, half_keep(graph))
    rebuilt = jp.rebuild_linen(model, pruned)
    x3 = batch(GroupNormNet, 3)
    close(rebuilt.apply(pruned.variables, x3), pruned.apply_fn(pruned.variables, x3))


@pytest.mark.slow
def test_layer_norm_statistics_are_over_the_kept_channels():
    """The pruned LayerNorm equals a narrower LayerNorm on the kept channels (its mean and
    variance divide by the kept count), and so does the masked model."""

    class Net(nn.Module):
        width: int = 12

        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.Conv(self.width, (3, 3))(x))
            x = nn.RMSNorm()(nn.Conv(self.width, (1, 1))(x))
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    x = batch(GroupNormNet, 2)
    model = Net()
    variables = model.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(
        lambda a: a + 0.1 * np.random.default_rng(0).standard_normal(a.shape), variables
    )
    graph = jp.channel_graph(model.apply, variables, x)
    assert graph.counts, "the means' divisors are found"
    keep = {"Conv_0": np.arange(0, 12, 2), "Conv_1": np.arange(5)}
    pruned = jp.prune(variables, graph, keep)
    narrower = Net(width=6)  # both groups: LayerNorm's and RMSNorm's over 6 and 5 channels
    # A narrower model whose two layers have 6 and 5 channels: build it by hand.

    class Narrow(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.Conv(6, (3, 3))(x))
            x = nn.RMSNorm()(nn.Conv(5, (1, 1))(x))
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    del narrower
    reference = Narrow().apply(pruned.variables, x)
    close(reference, pruned.apply_fn(pruned.variables, x))
    masked = jp.gated_call(model.apply, graph, variables, x, jp.keep_to_masks(graph, keep))
    close(reference, masked)


@pytest.mark.slow
def test_convnext_blocks_prune_every_group():
    model, variables, x, _ = init_linen(TinyConvNeXt)
    graph = jp.channel_graph(model.apply, variables, x)
    assert set(graph.names) == {"Conv_0", "ConvNeXtBlock_0/Dense_0", "ConvNeXtBlock_1/Dense_0"}
    stream = graph["Conv_0"]
    assert {"ConvNeXtBlock_0/Conv_0", "ConvNeXtBlock_1/Dense_1"} <= set(stream.producers)


def test_group_norm_groups_prune_in_whole_blocks():
    model, variables, x, _ = init_linen(GroupNormNet)
    graph = jp.channel_graph(model.apply, variables, x)
    assert graph["Conv_0"].block == 4 and graph["Conv_1"].block == 4
    with pytest.raises(PruneError, match="blocks of 4.*round_keep_to_blocks"):
        jp.prune(variables, graph, {"Conv_0": np.arange(6)})
    # A block stays when at least half of its channels do.
    rounded = jp.round_keep_to_blocks(graph, {"Conv_0": np.arange(6), "Conv_1": np.arange(5)})
    np.testing.assert_array_equal(rounded["Conv_0"], np.arange(8))
    np.testing.assert_array_equal(rounded["Conv_1"], np.arange(4))
    scores = {"Conv_0": np.repeat([0.0, 5.0, 1.0, 2.0], 4)}
    by_score = jp.round_keep_to_blocks(graph, {"Conv_0": np.arange(8)}, scores)
    np.testing.assert_array_equal(by_score["Conv_0"], np.r_[4:8, 12:16])
    pruned = jp.prune(variables, graph, by_score)
    assert pruned.variables["params"]["GroupNorm_0"]["scale"].shape == (8,)


def test_weight_standardised_convolutions_are_followed():
    model, variables, x, _ = init_linen(WeightStandardised)
    graph = jp.channel_graph(model.apply, variables, x)
    assert graph.names == ("StdConv_0", "StdConv_1")
    # The second kernel's standardisation reduces over the first group's channels.
    assert graph.reductions and graph.counts


def test_returned_feature_maps_are_fixed():
    model, variables, x, _ = init_linen(FeaturesOut)
    graph = jp.channel_graph(model.apply, variables, x)
    assert "Conv_1" in graph.fixed and "output" in graph.fixed["Conv_1"]
    pruned = jp.prune(variables, graph, half_keep(graph))
    _, features = pruned.apply_fn(pruned.variables, x)
    assert features["stage2"].shape == (2, 8, 8, 12)


def test_constants_sized_by_channels_are_sliced():
    model, variables, x, _ = init_linen(ChannelConstants)
    graph = jp.channel_graph(model.apply, variables, x)
    keep = {"Conv_0": np.array([0, 5, 11])}
    pruned = jp.prune(variables, graph, keep)
    masked = jp.gated_call(model.apply, graph, variables, x, jp.keep_to_masks(graph, keep))
    close(masked, pruned.apply_fn(pruned.variables, x))


@pytest.mark.slow
def test_a_channel_shuffle_prunes_in_blocks():
    class Shuffle(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(12, (3, 3))(x))
            n, h, w, c = x.shape
            x = x.reshape(n, h, w, 3, c // 3).transpose(0, 1, 2, 4, 3).reshape(n, h, w, c)
            x = nn.relu(nn.Conv(6, (3, 3))(x))
            return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))

    x = batch(GroupNormNet, 2)
    model = Shuffle()
    variables = model.init(jax.random.key(0), x)
    graph = jp.channel_graph(model.apply, variables, x)
    assert graph["Conv_0"].block == 4
    keep = {"Conv_0": np.r_[0:4, 8:12]}
    pruned = jp.prune(variables, graph, keep)
    masked = jp.gated_call(model.apply, graph, variables, x, jp.keep_to_masks(graph, keep))
    close(masked, pruned.apply_fn(pruned.variables, x))


@pytest.mark.parametrize(
    "op, message",
    [
        (lambda y: jnp.sort(y, axis=-1), "'sort'"),
        (lambda y: jnp.argmax(y, axis=-1)[..., None] * y, "'argmax' over their channels"),
        (lambda y: jnp.cumsum(y, axis=-1), "cumulative sum"),
        (lambda y: jnp.pad(y, ((0, 0), (0, 0), (0, 0), (1, 1))), "padding"),
    ],
    ids=["sort", "argmax", "cumsum", "pad"],
)
def test_an_operation_on_channels_it_does_not_understand_names_the_model_line(op, message):
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.relu(nn.Conv(8, (3, 3))(x))
            y = op(y)
            return nn.Dense(2)(jnp.mean(y, axis=(1, 2)))

    x = batch(GroupNormNet, 2)
    variables = Odd().init(jax.random.key(0), x)
    with pytest.raises(GraphError, match=message) as info:
        jp.channel_graph(Odd().apply, variables, x)
    assert "test_pruned_program.py" in str(info.value)
    loose = jp.channel_graph(Odd().apply, variables, x, strict=False)
    assert "Conv_0" not in loose and "Conv_0" in loose.fixed


def test_max_over_channels_is_over_the_kept_ones():
    class MaxOut(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(8, (3, 3))(x)
            return nn.Dense(2)(jnp.max(y, axis=-1).reshape(x.shape[0], -1))

    x = batch(GroupNormNet, 2)
    variables = MaxOut().init(jax.random.key(0), x)
    graph = jp.channel_graph(MaxOut().apply, variables, x)
    keep = {"Conv_0": np.array([1, 2, 6])}
    pruned = jp.prune(variables, graph, keep)
    masked = jp.gated_call(MaxOut().apply, graph, variables, x, jp.keep_to_masks(graph, keep))
    close(masked, pruned.apply_fn(pruned.variables, x))


def test_the_self_check_refuses_a_program_that_disagrees():
    model, variables, x, _ = init_linen(ChannelConstants)
    graph = jp.channel_graph(model.apply, variables, x)
    pruned = jp.prune(variables, graph, half_keep(graph))
    wrong = jax.tree_util.tree_map(lambda a: a * 1.5, pruned.variables)
    bad = pruned.__class__(wrong, None, pruned.widths, pruned.keep, pruned.apply_fn)
    with pytest.raises(PruneError, match="differs from the masked model"):
        check_against_masks(graph, variables, bad)


def test_unpruned_variables_are_refused_by_the_pruned_program():
    model, variables, x, _ = init_linen(ChannelConstants)
    graph = jp.channel_graph(model.apply, variables, x)
    pruned = jp.prune(variables, graph, half_keep(graph))
    with pytest.raises(GraphError, match="Pass pruned.variables"):
        pruned.apply_fn(variables, x)


def test_pruning_a_pruned_program_composes_without_nesting():
    model, variables, x, _ = init_linen(ShapeBranchResNet)
    graph = jp.channel_graph(model.apply, variables, x)
    first = jp.prune(variables, graph, {"Conv_0": np.arange(12)})
    graph2 = jp.channel_graph(first.apply_fn, first.variables, x)
    assert graph2["Conv_0"].size == 12
    second = jp.prune(first.variables, graph2, {"Conv_0": np.arange(0, 12, 2)})
    assert second.apply_fn.graph is graph
    np.testing.assert_array_equal(second.apply_fn.keep["Conv_0"], np.arange(0, 12, 2))
    once = jp.prune(variables, graph, {"Conv_0": np.arange(0, 12, 2)})
    close(once.apply_fn(once.variables, x), second.apply_fn(second.variables, x))
