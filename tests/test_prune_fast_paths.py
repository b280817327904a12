"""The faster paths of `prune` give what the plain ones give.

* the self-check runs the pruned program op by op (`PrunedProgram.evaluate`) and the masked
  model on the graph's own trace: both equal their compiled / retraced forms;
* leaves in host memory are sliced with NumPy: the same values, dtypes and placement as
  `jnp.take`, and committed or traced leaves keep the `jnp.take` path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from user_models import LINEN_MODELS, close, half_keep, init_linen

import jaxprune as jp
from jaxprune.surgery import _masked_probe, axis_slices, probe_input, validate_keep


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", LINEN_MODELS[:4], ids=lambda c: c.__name__)
def test_evaluate_and_masked_probe_equal_their_plain_forms(model_cls):
    model, variables, x, kwargs = init_linen(model_cls)
    graph = jp.channel_graph(model.apply, variables, x, **kwargs)
    keep = half_keep(graph)
    pruned = jp.prune(variables, graph, keep, verify=False)
    probe = probe_input(graph)
    close(
        pruned.apply_fn.evaluate(pruned.variables, probe, **kwargs),
        pruned.apply_fn(pruned.variables, probe, **kwargs),
    )
    masks = jp.keep_to_masks(graph, keep)
    close(
        _masked_probe(graph, variables, probe, masks, kwargs),
        jp.gated_call(model.apply, graph, variables, probe, masks, **kwargs),
    )


def test_host_slicing_matches_jnp_take():
    model, variables, x, kwargs = init_linen(LINEN_MODELS[0])
    graph = jp.channel_graph(model.apply, variables, x, **kwargs)
    keep = validate_keep(graph, half_keep(graph))
    slices = axis_slices(graph, keep)
    pruned = jp.prune(variables, graph, keep, verify=False)
    flat = dict(jax.tree_util.tree_leaves_with_path(variables))
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(pruned.variables):
        assert isinstance(leaf, jax.Array) and leaf.dtype == flat[key_path].dtype
        assert not leaf.committed
    for path, spec in slices.items():
        leaf = variables
        for key in path:
            leaf = leaf[key]
        expected = leaf
        for axis, kept in spec.positions:
            expected = jnp.take(expected, jnp.asarray(kept), axis=axis)
        np.testing.assert_array_equal(np.asarray(spec.apply(leaf)), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(spec.apply(np.asarray(leaf))), expected)
        committed = jax.device_put(leaf, jax.devices()[0])
        assert spec.apply(committed).committed  # the jnp.take path keeps the placement
        traced = jax.jit(spec.apply)(leaf)
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(expected))
