"""Every zoo model: graph, masked == pruned in eval and train mode, rebuild from the width spec."""

import chex
import jax
import pytest
from core_helpers import random_keep

from jaxprune.gates import gated_call
from jaxprune.graph import channel_graph
from jaxprune.models import build_model, default_widths
from jaxprune.models.random_init import random_variables
from jaxprune.surgery import keep_to_masks, prune

# (model, input shape, widths scale): the big VGGs run narrower to keep the test fast; the
# structure, not the width, is what is under test.
ZOO = {
    "lenet5": ((2, 28, 28, 1), 1.0),
    "vgg_small": ((2, 28, 28, 1), 1.0),
    "vgg16_bn": ((2, 32, 32, 3), 0.125),
    "vgg16": ((2, 32, 32, 3), 0.03125),
    "resnet20": ((2, 32, 32, 3), 1.0),
    "resnet56": ((2, 32, 32, 3), 0.5),
}
NUM_CLASSES = 10


def make(name):
    shape, scale = ZOO[name]
    widths = {
        k: max(2, int(v * scale)) if k != "head" else v
        for k, v in default_widths(name, NUM_CLASSES).items()
    }
    model = build_model(name, NUM_CLASSES, widths)
    x = jax.random.normal(jax.random.key(0), shape)
    return model, random_variables(model, x), x


# LeNet-5 in the default tier, the larger zoo models in the slow one.
@pytest.mark.parametrize(
    "name", [n if n == "lenet5" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(ZOO)]
)
def test_zoo_masked_equals_pruned(name):
    model, variables, x = make(name)
    graph = channel_graph(model.apply, variables, x)
    assert len(graph) > 0 and "head" in graph.fixed
    keep = random_keep(graph, 0)
    pruned = prune(variables, graph, keep)
    small = build_model(name, NUM_CLASSES, pruned.widths)
    chex.assert_trees_all_equal_shapes(
        jax.eval_shape(small.init, jax.random.key(0), x), pruned.variables
    )
    masks = keep_to_masks(graph, keep)
    masked = jax.jit(lambda v, m: gated_call(model.apply, graph, v, x, m))(variables, masks)
    chex.assert_trees_all_close(
        jax.jit(small.apply)(pruned.variables, x), masked, atol=2e-4, rtol=2e-4
    )

    # Training mode: same output and same updated statistics for the surviving channels.
    # Dropout draws its mask per feature, so groups that dropout reads keep their width here.
    dropped = {"fc1", "fc2"} if name in ("vgg_small", "vgg16") else set()
    keep = {k: v for k, v in keep.items() if k not in dropped}
    kw = dict(train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
    masked_out, masked_stats = gated_call(
        model.apply, graph, variables, x, keep_to_masks(graph, keep), **kw
    )
    pruned = prune(variables, graph, keep)
    small = build_model(name, NUM_CLASSES, pruned.widths)
    out, stats = small.apply(pruned.variables, x, **kw)
    chex.assert_trees_all_close(out, masked_out, atol=2e-4, rtol=2e-4)
    if masked_stats:
        expected = prune({**variables, **masked_stats}, graph, keep).variables["batch_stats"]
        chex.assert_trees_all_close(stats["batch_stats"], expected, atol=1e-5, rtol=1e-5)


def test_resnet_groups_follow_the_residual_stages():
    model, variables, x = make("resnet20")
    graph = channel_graph(model.apply, variables, x)
    # 3 residual groups (one per stage) + 9 inner groups (conv1 of every block).
    assert len(graph) == 12
    stage1 = graph["stem"]
    assert set(stage1.producers) == {"stem"} | {f"stage1/block{i}/conv2" for i in range(3)}
    assert set(graph["stage2/block0/conv2"].producers) >= {"stage2/block0/shortcut"}
