"""The oracle's split-half reliability: exact recombination of the halves, the formulas."""

import math

import jax
import numpy as np
import pytest
import scipy.stats
from core_helpers import init
from toy_models import ConvBNDense

from jaxprune.criteria import ScoringContext, score
from jaxprune.criteria.reliability import (
    SplitHalf,
    oracle_by_halves,
    spearman_brown,
    split_half,
)
from jaxprune.graph import channel_graph

X = jax.random.normal(jax.random.key(3), (10, 8, 8, 3))
Y = np.array([0, 1, 2, 0, 1, 2, 3, 4, 0, 1], np.int32)
# Batches of 3, 3 and 4 images: the halves are cut at image 5, not at a batch boundary.
BATCHES = [
    {"image": X[:3], "label": Y[:3]},
    {"image": X[3:6], "label": Y[3:6]},
    {"image": X[6:], "label": Y[6:]},
]


@pytest.fixture(scope="module")
def model():
    net = ConvBNDense()
    variables = init(net, X)
    return variables, ScoringContext(net.apply, channel_graph(net.apply, variables, X))


@pytest.mark.parametrize("oracle", ["oracle_loss", "oracle_abs"])
def test_the_halves_recombine_into_the_oracle_on_all_the_data(model, oracle):
    variables, context = model
    combined, reliability = oracle_by_halves(oracle, context, variables, BATCHES)
    whole = score(oracle, context, variables, BATCHES)
    assert set(combined) == set(whole)
    for group in whole:
        np.testing.assert_allclose(combined[group], whole[group], rtol=1e-5, atol=1e-7)
    assert reliability.examples == (5, 5)
    half_a = score(oracle, context, variables, [{"image": X[:5], "label": Y[:5]}])
    half_b = score(oracle, context, variables, [{"image": X[5:], "label": Y[5:]}])
    for group, value in reliability.per_layer.items():
        assert value == pytest.approx(scipy.stats.spearmanr(half_a[group], half_b[group])[0])


def test_spearman_brown_and_the_ceiling():
    assert spearman_brown(0.5) == pytest.approx(2 * 0.5 / 1.5)
    assert spearman_brown(0.25, factor=4) == pytest.approx(1.0 / 1.75)
    assert spearman_brown(1.0) == 1.0 and spearman_brown(0.0) == 0.0
    assert math.isnan(spearman_brown(math.nan)) and math.isnan(spearman_brown(-1.0))
    assert math.isnan(spearman_brown(-0.4))  # disagreeing halves: nothing to extrapolate
    halves = SplitHalf({"a": 0.6, "b": -0.2, "c": math.nan}, (100, 100))
    assert halves.whole["a"] == pytest.approx(0.75)
    assert halves.ceiling["a"] == pytest.approx(math.sqrt(0.75))
    assert math.isnan(halves.ceiling["b"]) and math.isnan(halves.ceiling["c"])
    stored = halves.to_dict()
    assert stored["examples_per_half"] == [100, 100] and stored["split_half"]["c"] is None


def test_identical_halves_are_perfectly_reliable_and_independent_ones_are_not():
    rng = np.random.default_rng(0)
    truth = {"g": rng.normal(size=400)}
    same = split_half(truth, truth, (5, 5))
    assert same.per_layer["g"] == pytest.approx(1.0)
    noise = {"g": rng.normal(size=400)}
    assert abs(split_half(truth, noise, (5, 5)).per_layer["g"]) < 0.15


def test_bad_inputs_are_refused(model):
    variables, context = model
    with pytest.raises(ValueError, match="Only"):
        oracle_by_halves("taylor", context, variables, BATCHES)
    with pytest.raises(ValueError, match="at least two images"):
        oracle_by_halves("oracle_abs", context, variables, [{"image": X[:1], "label": Y[:1]}])
    with pytest.raises(ValueError, match="different groups"):
        split_half({"a": np.ones(3)}, {"b": np.ones(3)}, (1, 1))
    with pytest.raises(ValueError, match="3 scores in one half and 4"):
        split_half({"a": np.ones(3)}, {"a": np.ones(4)}, (1, 1))
