"""Criteria on the architectures that once broke them: BatchNorm after a concatenation
(DenseNet), no ReLU at the gate (ConvNeXt), NNX state paths, a graph of other variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from user_models import NnxCNN, TinyConvNeXt, TinyDenseNet, init_linen

import jaxprune as jp
from jaxprune.criteria import ScoringContext, score


def context_of(model_cls):
    model, variables, x, kwargs = init_linen(model_cls)
    variables = jax.tree_util.tree_map(
        lambda a: a + 0.3 * np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype),
        variables,
    )
    graph = jp.channel_graph(model.apply, variables, x, **kwargs)
    return ScoringContext(model.apply, graph, apply_kwargs=kwargs), variables, x


@pytest.mark.slow
def test_batch_norm_after_a_concatenation_counts_for_each_group():
    """In a DenseNet every layer's output is normalised by every later layer's BatchNorm, over
    the concatenation; each of those scales holds the group's channels at an offset."""
    context, variables, _ = context_of(TinyDenseNet)
    got = score("bn_gamma", context, variables)
    params = variables["params"]
    # DenseLayer_0's 6 channels sit at 8..13 of the 14-channel input of DenseLayer_1's BN, of
    # the 20-channel input of DenseLayer_2's BN, and of the final BN (26 channels).
    expected = (
        np.abs(np.asarray(params["DenseLayer_1"]["BatchNorm_0"]["scale"])[8:14])
        + np.abs(np.asarray(params["DenseLayer_2"]["BatchNorm_0"]["scale"])[8:14])
        + np.abs(np.asarray(params["BatchNorm_0"]["scale"])[8:14])
    )
    np.testing.assert_allclose(got["DenseLayer_0/Conv_0"], expected, rtol=1e-6)
    # Every group has BatchNorm scales, the stem's included.
    assert set(got) == set(context.graph.names)
    taylor = score(
        "taylor_bn_gamma", context, variables, {"image": _x(TinyDenseNet), "label": _y()}
    )
    assert set(taylor) == set(context.graph.names)
    assert all(np.all(np.isfinite(v)) for v in taylor.values())


def _x(model_cls, n=4):
    shape = (n, *model_cls.SHAPE[1:])
    return jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)


def _y(n=4):
    return jnp.arange(n, dtype=jnp.int32) % 3


@pytest.mark.slow
def test_apoz_leaves_out_groups_without_a_relu():
    """APoZ counts zeros after a ReLU; after a LayerNorm or a GELU nothing is exactly zero, and
    scoring every channel 1 there would be a wrong answer."""
    context, variables, _ = context_of(TinyConvNeXt)
    got = score("apoz", context, variables, {"image": _x(TinyConvNeXt), "label": _y()})
    assert got == {}
    context, variables, _ = context_of(TinyDenseNet)
    got = score("apoz", context, variables, {"image": _x(TinyDenseNet), "label": _y()})
    assert set(got) == set(context.graph.names)
    assert all(np.all((0 <= v) & (v <= 1)) for v in got.values())


@pytest.mark.slow
def test_weight_criteria_refuse_variables_of_another_graph():
    context, variables, _ = context_of(TinyDenseNet)
    pruned = jp.prune(variables, context.graph, {"Conv_0": np.arange(4)})
    with pytest.raises(ValueError, match="do not match the channel graph.*shapes differ"):
        score("l1", context, pruned.variables)


def test_criteria_read_nnx_state_paths():
    model = NnxCNN(rngs=nnx.Rngs(0))
    model.eval()
    x = _x(NnxCNN)
    graph = jp.nnx.channel_graph(model, x)
    assert graph.names == ("conv1", "conv2", "linear1")
    apply_fn, variables = jp.nnx.as_apply(model)
    context = ScoringContext(apply_fn, graph, apply_kwargs={})
    l1 = score("l1", context, variables)
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    np.testing.assert_allclose(l1["conv1"], np.abs(kernel).reshape(-1, 16).sum(0), rtol=1e-6)
    gamma = score("bn_gamma", context, variables)
    np.testing.assert_allclose(
        gamma["conv1"], np.abs(np.asarray(variables["params"]["bn1"]["scale"]))
    )
    assert "conv2" not in gamma  # no BatchNorm there
    taylor = score("taylor", context, variables, {"image": x, "label": _y(4)})
    assert {k: v.shape for k, v in taylor.items()} == {
        "conv1": (16,),
        "conv2": (32,),
        "linear1": (64,),
    }
