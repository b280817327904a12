"""Progressive simplification on models written without jaxprune in mind: hard-coded widths,
a residual network whose shortcut depends on the shapes, and an NNX module. No rebuild: after
each layer the model is the pruned program."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from user_models import CompactHardCoded, NnxCNN, ShapeBranchResNet, init_linen

import jaxprune as jp
from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune
from jaxprune.model import Model


def batches_for(shape, classes, count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.standard_normal((8, *shape[1:])).astype(np.float32),
            "label": rng.integers(0, classes, 8).astype(np.int32),
        }
        for _ in range(count)
    ]


def settings(**changes):
    values = dict(
        ratio=0.25,
        score_examples=16,
        score_batch_size=8,
        batch_size=8,
        learning_rates=((0, 0.01),),
        eval_examples=16,
        sample_images=4,
    )
    return ProgressiveConfig(**{**values, **changes})


def check_pruned(model, variables, result, batches):
    """The result runs at the kept widths and equals the masked original when nothing trained."""
    graph = jp.channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    for name, kept in result.keep.items():
        assert kept.size == graph[name].size - int(0.25 * graph[name].size)
    image = batches[0]["image"]
    masked = jp.gated_call(
        model.apply_fn,
        graph,
        variables,
        image,
        jp.keep_to_masks(graph, result.keep),
        **model.eval_kwargs,
    )
    np.testing.assert_allclose(result.model(result.variables, image), masked, atol=1e-4)
    cost = result.summary["cost"]
    assert cost["after"]["macs"] < cost["before"]["macs"]


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", [CompactHardCoded, ShapeBranchResNet])
def test_a_hard_coded_linen_model_is_simplified_without_rebuild(model_cls):
    module, variables, x, _ = init_linen(model_cls)
    model = Model.linen(module, x, variables=variables)
    batches = batches_for(model_cls.SHAPE, 10 if model_cls is CompactHardCoded else 5)
    graph = jp.channel_graph(model.apply_fn, variables, model.example_input, **model.eval_kwargs)
    # The stem and the first bottleneck of the ResNet (its identity shortcut) are enough.
    layers = tuple(g.name for g in graph.groups if g.kind == "conv")[:3]
    result = progressive_prune(
        model, variables, batches, settings(retraining="none", layers=layers), progress=False
    )
    check_pruned(model, variables, result, batches)
    trained = progressive_prune(model, variables, batches, settings(layers=layers), progress=False)
    assert all(r["loss"]["updates"] == 4 for r in trained.history)
    logits = trained.model(trained.variables, batches[0]["image"])
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_an_nnx_model_is_simplified_and_its_later_layers_stay_frozen():
    module = NnxCNN(rngs=nnx.Rngs(0))
    model, variables = Model.nnx(module, jax.numpy.zeros(NnxCNN.SHAPE))
    batches = batches_for(NnxCNN.SHAPE, 10)
    result = progressive_prune(
        model, variables, batches, settings(retraining="none"), progress=False
    )
    check_pruned(model, variables, result, batches)
    first = progressive_prune(
        model, variables, batches, settings(layers=(result.history[0]["group"],)), progress=False
    )
    # Only the layers up to the target train; the dense layers after it are bit-identical.
    for layer in ("linear1", "linear2"):
        np.testing.assert_array_equal(
            first.variables["params"][layer]["kernel"], variables["params"][layer]["kernel"]
        )
    assert first.history[0]["loss"]["updates"] == 4
