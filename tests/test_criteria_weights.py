"""Weight criteria against NumPy loops over the kernels: norms, FPGM, Fermat, BN scale/shift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import init
from toy_models import ConvBNDense, DepthwiseSeparable, ResidualProjection, TwoBranchConcat

from jaxprune.criteria import ScoringContext, geometric_median, score
from jaxprune.graph import channel_graph

X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


def setup(model):
    variables = init(model, X)
    # Non-trivial BatchNorm parameters (init gives scale 1, bias 0).
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jnp.asarray(rng.normal(0, 1, v.shape), v.dtype) if p[-1].key in ("scale", "bias") else v
        ),
        variables["params"],
    )
    variables = {**variables, "params": params}
    graph = channel_graph(model.apply, variables, X)
    return variables, ScoringContext(model.apply, graph)


def filter_rows(params, layers):
    """Row c: every producer kernel's W[..., c], flattened and concatenated (a NumPy loop)."""
    kernels = [np.asarray(params[layer]["kernel"], np.float64) for layer in layers]
    size = kernels[0].shape[-1]
    return np.stack([np.concatenate([k[..., c].ravel() for k in kernels]) for c in range(size)])


@pytest.fixture(scope="module")
def residual():
    return setup(ResidualProjection())


def test_norms_on_a_plain_conv_and_on_a_residual_group(residual):
    variables, context = residual
    params = variables["params"]
    for group, layers in (
        ("b1_conv1", ["b1_conv1"]),
        ("b1_conv2", ["b1_conv2", "b1_shortcut", "b2_conv2"]),
    ):
        assert set(context.graph[group].producers) == set(layers)
        rows = filter_rows(params, sorted(layers, key=context.graph[group].producers.index))
        expected = {
            "l1": [sum(abs(w) for w in row) for row in rows],
            "l2": [np.sqrt(sum(w * w for w in row)) for row in rows],
            "min_weight": [sum(w * w for w in row) / len(row) for row in rows],
        }
        for name, values in expected.items():
            np.testing.assert_allclose(score(name, context, variables)[group], values, rtol=1e-6)


def test_l1_of_a_residual_group_is_the_sum_over_its_producers(residual):
    variables, context = residual
    params = variables["params"]
    per_producer = sum(
        np.abs(np.asarray(params[layer]["kernel"])).sum(axis=(0, 1, 2))
        for layer in ("b1_conv2", "b1_shortcut", "b2_conv2")
    )
    np.testing.assert_allclose(score("l1", context, variables)["b1_conv2"], per_producer, rtol=1e-6)


def test_depthwise_kernel_is_part_of_its_groups_filters():
    variables, context = setup(DepthwiseSeparable())
    params = variables["params"]
    rows = filter_rows(params, ["stem", "depthwise"])
    assert rows.shape == (8, 3 * 3 * 3 + 3 * 3 * 1)
    np.testing.assert_allclose(
        score("l2", context, variables)["stem"], np.linalg.norm(rows, axis=1), rtol=1e-6
    )


def test_fpgm_sums_distances_to_the_surviving_filters(residual):
    variables, context = residual
    rows = filter_rows(variables["params"], ["b1_conv1"])
    n = len(rows)
    expected = [sum(np.linalg.norm(rows[c] - rows[j]) for j in range(n)) for c in range(n)]
    np.testing.assert_allclose(score("fpgm", context, variables)["b1_conv1"], expected, rtol=1e-6)

    removed = [1, 4]
    mask = np.ones(n, np.float32)
    mask[removed] = 0
    masked = score("fpgm", context, variables, masks={"b1_conv1": mask})["b1_conv1"]
    alive = [j for j in range(n) if j not in removed]
    for c in range(n):
        if c in removed:
            assert masked[c] == -np.inf
        else:
            want = sum(np.linalg.norm(rows[c] - rows[j]) for j in alive)
            np.testing.assert_allclose(masked[c], want, rtol=1e-6)


def test_geometric_median_is_optimal():
    points = np.random.default_rng(0).normal(size=(9, 5))
    median = geometric_median(points)
    unit = (points - median) / np.linalg.norm(points - median, axis=1, keepdims=True)
    # The gradient of the summed distance vanishes at the geometric median ...
    np.testing.assert_allclose(unit.sum(0), 0, atol=1e-6)

    # ... and every nearby point has a larger summed distance.
    def total(y):
        return np.linalg.norm(points - y, axis=1).sum()

    for step in np.random.default_rng(1).normal(size=(20, 5)) * 1e-2:
        assert total(median + step) > total(median)
    with pytest.raises(ValueError, match="shape"):
        geometric_median(np.zeros(3))


def test_fermat_is_the_distance_to_the_geometric_median(residual):
    variables, context = residual
    rows = filter_rows(variables["params"], ["stem"])
    median = geometric_median(rows)
    np.testing.assert_allclose(
        score("fermat", context, variables)["stem"],
        [np.linalg.norm(r - median) for r in rows],
        rtol=1e-6,
    )


def test_batch_norm_criteria_sum_over_the_groups_batch_norm_layers(residual):
    variables, context = residual
    p = variables["params"]
    gamma = score("bn_gamma", context, variables)
    beta = score("bn_beta", context, variables)
    np.testing.assert_allclose(gamma["stem"], np.abs(p["stem_bn"]["scale"]), rtol=1e-6)
    np.testing.assert_allclose(beta["b1_conv1"], np.abs(p["b1_bn1"]["bias"]), rtol=1e-6)
    layers = ("b1_bn2", "b1_bn_sc", "b2_bn2")
    np.testing.assert_allclose(
        gamma["b1_conv2"], sum(np.abs(p[b]["scale"]) for b in layers), rtol=1e-6
    )
    np.testing.assert_allclose(
        beta["b1_conv2"], sum(np.abs(p[b]["bias"]) for b in layers), rtol=1e-6
    )


def test_batch_norm_criteria_leave_out_groups_without_batch_norm():
    variables, context = setup(ConvBNDense())
    assert set(score("bn_gamma", context, variables)) == {"conv0", "conv1"}  # not "fc"
    variables, context = setup(TwoBranchConcat())
    assert score("bn_beta", context, variables) == {}
    # The conv biases of this model are not BatchNorm shifts.
    assert set(score("l1", context, variables)) == {"branch_a", "branch_b", "mix"}


def test_weight_criteria_ignore_batches_and_mark_removed_channels(residual):
    variables, context = residual
    mask = np.ones(6, np.float32)
    mask[2] = 0
    plain = score("l1", context, variables)
    masked = score("l1", context, variables, batches=None, masks={"stem": mask})
    assert masked["stem"][2] == -np.inf
    np.testing.assert_array_equal(np.delete(masked["stem"], 2), np.delete(plain["stem"], 2))
    np.testing.assert_array_equal(masked["b1_conv1"], plain["b1_conv1"])
