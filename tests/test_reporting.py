"""Tests of jaxprune.commands.reporting: the parts every pruning runner's report is built from."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint, data
from jaxprune.commands import reporting
from jaxprune.graph import channel_graph

LENET = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


@pytest.fixture(scope="module")
def lenet():
    model, variables, _ = checkpoint.load_model_file(LENET)
    dataset = data.load(data.DataConfig(validation_examples=64, test_examples=64))
    return model, variables, dataset


def test_keep_lists_and_plain_json_are_json():
    keep = {"conv1": np.array([0, 2], np.int64), "conv2": [1]}
    assert reporting.keep_lists(keep) == {"conv1": [0, 2], "conv2": [1]}
    value = {"a": np.float32(0.5), "b": [np.int64(3)], "c": {"d": np.arange(2)}}
    plain = reporting.plain_json(value)
    assert plain == {"a": 0.5, "b": [3], "c": {"d": [0, 1]}}
    assert json.loads(json.dumps(plain)) == plain


def test_channels_remaining_counts_unnamed_groups_as_whole(lenet):
    model, variables, dataset = lenet
    graph = channel_graph(model.apply, variables, jnp.zeros((1, *dataset.image_shape)))
    sizes = {g: graph[g].size for g in ("conv1", "conv2")}
    fraction = reporting.channels_remaining(graph, ["conv1", "conv2"], {"conv1": [0, 1]})
    assert fraction == pytest.approx((2 + sizes["conv2"]) / sum(sizes.values()))
    assert reporting.channels_remaining(graph, ["conv2"], {}) == 1.0


def test_pruned_summary_measures_before_and_after_fine_tuning(lenet):
    model, variables, dataset = lenet
    pair = (model.apply, variables)
    summary, final = reporting.pruned_summary(
        pair, pair, dataset, batch_size=32, channels_remaining=0.5
    )
    assert final is variables and "before_finetune" not in summary
    assert summary["final"]["remaining"] == {"flops": 1, "macs": 1, "params": 1, "channels": 0.5}
    assert summary["validation"] == reporting.measure(*pair, dataset, batch_size=32)["validation"]

    tuned = {**variables, "params": {**variables["params"]}}
    tuned["params"]["head"] = {k: -v for k, v in variables["params"]["head"].items()}
    tuned_summary, tuned_final = reporting.pruned_summary(
        pair, pair, dataset, batch_size=32, fine_tune=lambda: tuned
    )
    assert tuned_final is tuned
    assert tuned_summary["before_finetune"] == {k: summary[k] for k in ("validation", "test")}
    assert (
        tuned_summary["test"]
        == reporting.measure(model.apply, tuned, dataset, batch_size=32)["test"]
    )
    assert tuned_summary["test"] != summary["test"]
