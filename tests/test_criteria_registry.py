"""The registry, `score`'s input checks, the random baseline and the score transforms."""

import jax
import numpy as np
import pytest
from core_helpers import init
from toy_models import ConvBNDense

from jaxprune.criteria import (
    CRITERIA,
    Criterion,
    ScoringContext,
    flops_per_channel,
    flops_regularize,
    get_criterion,
    l1_norm,
    normalize_l2,
    normalize_max,
    normalize_rank,
    register,
    score,
)
from jaxprune.graph import channel_graph

X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
BATCH = {"image": X, "label": np.array([0, 1], np.int32)}
NAMES = """l1 l2 min_weight fpgm fermat bn_gamma bn_beta activation_mean activation_std apoz
entropy hrank mutual_info taylor taylor_abs_then_mean taylor_signed_sum taylor_bn_gamma
taylor_bn_beta taylor_weight_l1 taylor_weight_l2 oracle_loss oracle_abs random""".split()


@pytest.fixture(scope="module")
def conv_bn_dense():
    model = ConvBNDense()
    variables = init(model, X)
    return variables, ScoringContext(model.apply, channel_graph(model.apply, variables, X))


def test_every_named_criterion_is_registered_under_its_own_name():
    assert set(NAMES) <= set(CRITERIA)
    for name in NAMES:
        criterion = get_criterion(name)
        assert isinstance(criterion, Criterion) and criterion.name == name


def test_registry_errors_name_the_problem():
    with pytest.raises(KeyError, match="Known criteria: .*taylor"):
        get_criterion("tailor")
    with pytest.raises(TypeError, match="bins"):
        get_criterion("l1", bins=3)
    with pytest.raises(ValueError, match="already registered"):
        register("l1", l1_norm)
    with pytest.raises(ValueError, match="callable"):
        register("not_a_function_criterion", 3)
    with pytest.raises(TypeError):
        CRITERIA["mine"] = l1_norm  # read-only view


def test_a_registered_criterion_is_scored_by_name(conv_bn_dense):
    variables, context = conv_bn_dense

    def doubled_l1():
        base = l1_norm()
        return base._replace(
            name="doubled_l1_for_tests",
            finalize=lambda *a: {k: 2 * v for k, v in base.finalize(*a).items()},
        )

    register("doubled_l1_for_tests", doubled_l1)
    np.testing.assert_allclose(
        score("doubled_l1_for_tests", context, variables)["conv0"],
        2 * score("l1", context, variables)["conv0"],
    )


def test_score_checks_its_inputs(conv_bn_dense):
    variables, context = conv_bn_dense
    with pytest.raises(ValueError, match="unknown group 'conv7'"):
        score("l1", context, variables, masks={"conv7": np.ones(6)})
    with pytest.raises(ValueError, match=r"needs \(6,\)"):
        score("l1", context, variables, masks={"conv0": np.ones(5)})
    with pytest.raises(ValueError, match="at least one batch"):
        score("apoz", context, variables, [])
    with pytest.raises(ValueError, match="constructor"):
        score(l1_norm(), context, variables, seed=1)
    with pytest.raises(ValueError, match="'label'"):
        score("apoz", context, variables, {"image": X})
    with pytest.raises(ValueError, match="one integer label per image"):
        score("apoz", context, variables, {"image": X, "label": np.zeros(3, np.int32)})


def test_scores_come_in_graph_order_as_float64(conv_bn_dense):
    variables, context = conv_bn_dense
    scores = score("taylor", context, variables, BATCH)
    assert tuple(scores) == context.graph.names
    for name, values in scores.items():
        assert values.dtype == np.float64 and values.shape == (context.graph[name].size,)


def test_random_is_seeded_and_deterministic(conv_bn_dense):
    variables, context = conv_bn_dense
    first = score("random", context, variables)
    again = score("random", context, variables, seed=0)
    other = score("random", context, variables, seed=1)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])
        assert ((first[name] >= 0) & (first[name] < 1)).all()
    masked = score("random", context, variables, masks={"fc": np.eye(12)[3] * -1 + 1})
    assert masked["fc"][3] == -np.inf
    np.testing.assert_array_equal(np.delete(masked["fc"], 3), np.delete(first["fc"], 3))
    with pytest.raises(ValueError, match="seed"):
        get_criterion("random", seed=-1)


def test_normalisations():
    scores = {"a": np.array([3.0, -np.inf, 4.0]), "b": np.array([0.0, 0.0]), "c": [2.0, -6.0]}
    l2 = normalize_l2(scores)
    np.testing.assert_allclose(l2["a"], [0.6, -np.inf, 0.8])
    np.testing.assert_array_equal(l2["b"], [0.0, 0.0])  # all zero: unchanged, not NaN
    np.testing.assert_allclose(normalize_max(scores)["c"], [1 / 3, -1.0])
    ranks = normalize_rank({"a": [5.0, 1.0, 5.0, 3.0, -np.inf], "lone": [7.0]})
    np.testing.assert_allclose(ranks["a"], [2.5 / 3, 0.0, 2.5 / 3, 1 / 3, -np.inf])
    np.testing.assert_array_equal(ranks["lone"], [1.0])
    assert scores["a"][0] == 3.0  # inputs are not modified
    with pytest.raises(ValueError, match="NaN"):
        normalize_l2({"a": [np.nan]})


def test_flops_per_channel_counts_producers_and_consumers(conv_bn_dense):
    variables, context = conv_bn_dense
    cost = flops_per_channel(context.apply_fn, context.graph, variables, X)
    # Molchanov's FLOPs: conv 2*H*W*(C_in*K^2 + 1)*C_out, dense (2*I - 1)*O; per channel.
    conv0 = 2 * 8 * 8 * (3 * 9 + 1) * 6 / 6
    conv1 = 2 * 8 * 8 * (6 * 9 + 1) * 8
    fc = (2 * 128 - 1) * 12  # after the pool: 4 * 4 * 8 = 128 inputs
    head = (2 * 12 - 1) * 5
    want = {
        "conv0": conv0 + conv1 / 6,
        "conv1": conv1 / 8 + fc * 16 / 128,  # one channel feeds 4 * 4 rows of fc
        "fc": fc / 12 + head / 12,
    }
    for name, value in want.items():
        np.testing.assert_allclose(cost[name], value / 1e6, rtol=1e-9)


def test_flops_regularisation_subtracts_lambda_times_cost():
    scores = {"a": np.array([1.0, -np.inf]), "b": np.array([0.5, 0.25])}
    got = flops_regularize(scores, {"a": 2.0, "b": [10.0, 20.0]}, strength=0.01)
    np.testing.assert_allclose(got["a"], [0.98, -np.inf])
    np.testing.assert_allclose(got["b"], [0.4, 0.05])
    np.testing.assert_allclose(flops_regularize({"a": [1.0]}, {"a": 100.0})["a"], [0.9])
    with pytest.raises(ValueError, match=r"groups \['b'\]"):
        flops_regularize(scores, {"a": 1.0})
