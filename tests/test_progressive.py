"""Progressive retraining (Osaku et al. 2021): kernel choice, freezing, retraining, replay, run."""

from __future__ import annotations

import dataclasses
import json
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ConvBNDense

from jaxprune import checkpoint, criteria, data
from jaxprune.commands import run_progressive
from jaxprune.graph import channel_graph
from jaxprune.inspect import standin
from jaxprune.inspect.selection import SelectionError, selection_document, write_selection
from jaxprune.methods import progressive_retrain as retraining
from jaxprune.methods.progressive import (
    ProgressiveConfig,
    check_config,
    lowest,
    make_network,
    progressive_prune,
    reinit_head,
    removal_count,
)
from jaxprune.models import build_model

SMALL_WIDTHS = {f"conv{i}": 4 for i in range(1, 7)} | {"fc1": 8}


@pytest.fixture(scope="module")
def tiny_data():
    return data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )


@pytest.fixture(scope="module")
def small_vgg():
    """A narrow VGG-small (4 kernels per conv) with random weights and non-trivial BN stats."""
    model = build_model("vgg_small", 10, SMALL_WIDTHS)
    x = jnp.zeros((1, 28, 28, 1))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    stats = jax.tree.map(lambda v: v + 0.1, variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


def config(**changes) -> ProgressiveConfig:
    values = dict(
        ratio=0.25,
        score_examples=32,
        score_batch_size=32,
        batch_size=8,
        retrain_examples=16,
        eval_examples=0,
        sample_images=4,
    )
    return ProgressiveConfig(**{**values, **changes})


def rebuild(widths):
    return build_model("vgg_small", 10, widths).apply


# ---------------------------------------------------------------------------------------------
# Pure pieces against NumPy references


@pytest.mark.parametrize(
    "changes, index, size, expected",
    [
        ({"ratio": 0.05}, 0, 32, 2),  # round(1.6)
        ({"ratio": 0.25}, 3, 64, 16),
        ({"count": 3}, 0, 32, 3),
        ({"count": 40}, 0, 32, 31),  # never empties a layer
        ({"per_layer": (1, 0.5, 0)}, 1, 10, 5),
        ({"per_layer": (1, 0.5, 0)}, 0, 10, 1),
        ({"ratio": 0.5, "min_channels": 8}, 0, 10, 2),
    ],
)
def test_removal_count(changes, index, size, expected):
    assert removal_count(ProgressiveConfig(**changes), index, size) == expected


def test_lowest_takes_the_smallest_scores_ties_to_the_lower_index():
    scores = np.array([0.3, -1.0, 0.3, 0.2, 0.3, 5.0])
    np.testing.assert_array_equal(lowest(scores, 3), [0, 1, 3])
    np.testing.assert_array_equal(lowest(scores, 3), np.sort(np.argsort(scores, kind="stable")[:3]))
    with pytest.raises(ValueError, match="NaN"):
        lowest(np.array([0.0, np.nan]), 1)


def test_learning_rate_breakpoints_follow_the_paper():
    rates = [retraining.learning_rate_for(ProgressiveConfig().learning_rates, i) for i in range(8)]
    assert rates == [1e-5, 1e-6, 1e-6, 1e-7, 1e-7, 1e-7, 1e-8, 1e-8]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"criterion": "nope"}, "neither a registered criterion"),
        ({"retraining": "partial"}, "retraining="),
        ({"loss": "l1"}, "loss="),
        ({"ratio": 1.0}, "ratio="),
        ({"per_layer": (0.5, 1.5)}, "fraction 1.5"),
        ({"learning_rates": ((1, 1e-3),)}, "starting at layer 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"criterion": "subjective"}, "needs a selection"),
        ({"per_layer": (1, True)}, "int"),
        ({"retrain_epochs": 1000}, "retrain_epochs must be < 1000"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(ProgressiveConfig(**changes))


def test_inputs_that_only_the_model_and_data_can_check_fail_before_any_work(
    tmp_path, small_vgg, tiny_data
):
    _, variables = small_vgg
    with pytest.raises(ValueError, match="per_layer has 3 entries for the 2 layers"):
        progressive_prune(
            config(layers=("conv1", "conv2"), per_layer=(1, 1, 1)),
            "vgg_small",
            variables,
            tiny_data,
        )
    missing = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        progressive_prune(
            config(
                criterion="subjective",
                selection=str(missing),
                wait_for_selection=True,
                poll_seconds=0.05,
                selection_timeout_s=2,
            ),
            "vgg_small",
            variables,
            tiny_data,
            workdir=tmp_path,
        )
    assert not (tmp_path / "selection").exists()  # refused before any page was written


def test_the_target_of_layer_l_plus_1_is_after_its_bn_relu_and_pooling(small_vgg, tiny_data):
    _, variables = small_vgg
    network = make_network(rebuild, variables, jnp.zeros((1, 28, 28, 1)))
    images = next(data.preprocessed_batches(tiny_data, "train", 4, 4))["image"]
    _, (target,) = retraining.target_values(network, images, "conv2", train=False)

    def block(x, index):
        params = variables["params"][f"conv{index}"]
        stats, bn = variables["batch_stats"][f"bn{index}"], variables["params"][f"bn{index}"]
        y = jax.lax.conv_general_dilated(
            x,
            params["kernel"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = (y - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
        return jax.nn.relu(y)

    hidden = block(block(images, 1), 2)
    pooled = hidden.reshape(4, 14, 2, 14, 2, 4).max(axis=(2, 4))  # the stage's 2x2 max pool
    chex.assert_shape(target, (4, 14, 14, 4))
    np.testing.assert_allclose(target, pooled, rtol=1e-4, atol=1e-5)


def test_upstream_of_finds_exactly_the_leaves_an_output_reads():
    tree = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(3)}

    def fn(t):
        hidden = jax.jit(lambda u, v: u * v)(t["a"], t["b"])
        _unused = t["c"] * 2
        return hidden.sum()

    assert retraining.upstream_of(fn, tree) == {"a": True, "b": True, "c": False}


def test_the_trainable_leaves_of_layer_l_are_layers_1_to_l_plus_1(small_vgg):
    model, variables = small_vgg
    network = make_network(rebuild, variables, jnp.zeros((1, 28, 28, 1)))
    assert retraining.next_group(network.graph, "conv2") == "conv3"
    assert retraining.next_group(network.graph, "conv6") == "fc1"
    trainable = retraining.trainable_for(network, "conv3", jnp.zeros((2, 28, 28, 1)))
    flat = {
        jax.tree_util.keystr(path): flag
        for path, flag in jax.tree_util.tree_leaves_with_path(trainable)
    }
    layers = {f"conv{i}" for i in (1, 2, 3)} | {f"bn{i}" for i in (1, 2, 3)}
    for path, flag in flat.items():
        layer = path.split("'")[3]
        assert flag == (layer in layers), path


# ---------------------------------------------------------------------------------------------
# One layer: choice, freezing, retraining


def test_the_objective_criterion_removes_the_kernels_whose_removal_leaves_the_lowest_loss(
    small_vgg, tiny_data
):
    _, variables = small_vgg
    result = progressive_prune(
        config(layers=("conv2",), retraining="none"), "vgg_small", variables, tiny_data
    )
    network = make_network(rebuild, variables, jnp.zeros((1, 28, 28, 1)))
    batch = next(data.preprocessed_batches(tiny_data, "train", 32, 32))
    reference = criteria.score(
        "oracle_loss", criteria.ScoringContext(network.apply_fn, network.graph), variables, [batch]
    )["conv2"]
    record = result.history[0]
    assert record["removed"] == [int(np.argmin(reference))]
    np.testing.assert_allclose(record["removed_scores"], [reference.min()], rtol=1e-6)
    assert result.widths["conv2"] == 3 and result.widths["conv1"] == 4
    np.testing.assert_array_equal(
        result.keep["conv2"], np.setdiff1d(np.arange(4), record["removed"])
    )
    # Without retraining the result is the surgery of the base model.
    kept = result.keep["conv2"]
    np.testing.assert_array_equal(
        result.variables["params"]["conv2"]["kernel"],
        np.asarray(variables["params"]["conv2"]["kernel"])[..., kept],
    )
    np.testing.assert_array_equal(
        result.variables["params"]["conv3"]["kernel"],
        np.asarray(variables["params"]["conv3"]["kernel"])[:, :, kept, :],
    )


def test_frozen_leaves_are_bit_identical_after_progressive_retraining(small_vgg, tiny_data):
    _, variables = small_vgg
    result = progressive_prune(
        config(layers=("conv1",), learning_rates=((0, 0.05),), retrain_examples=32),
        "vgg_small",
        variables,
        tiny_data,
    )
    assert result.history[0]["target_group"] == "conv2"
    kept = result.keep["conv1"]
    for collection in ("params", "batch_stats"):
        for layer, before in variables[collection].items():
            after = result.variables[collection][layer]
            index = int(layer[-1]) if layer[:-1] in ("conv", "bn") else 99
            for name, leaf in before.items():
                leaf = np.asarray(leaf)
                if layer == "conv2" and name == "kernel":
                    leaf = leaf[:, :, kept, :]
                elif layer in ("conv1", "bn1"):
                    leaf = leaf[..., kept]
                changed = not np.array_equal(leaf, np.asarray(after[name]))
                # layers 1..l+1 (here 1 and 2) train; conv3.., fc1 and the head never change.
                if index > 2:
                    assert not changed, f"{collection}/{layer}/{name} changed"
                    assert leaf.tobytes() == np.asarray(after[name]).tobytes()
                elif collection == "params" and name in ("kernel", "scale"):
                    assert changed, f"{collection}/{layer}/{name} did not train"


def test_the_mse_retraining_lowers_the_distance_to_the_model_before_pruning(small_vgg, tiny_data):
    _, variables = small_vgg
    x = jnp.zeros((1, 28, 28, 1))
    teacher = make_network(rebuild, variables, x)
    pruned = progressive_prune(
        config(layers=("conv1",), retraining="none"), "vgg_small", variables, tiny_data
    )
    student = make_network(rebuild, pruned.variables, x)
    plan = retraining.RetrainPlan(
        loss="mse",
        target_group="conv2",
        trainable=retraining.trainable_for(student, "conv2", x),
        learning_rate=0.05,
        momentum=0.9,
        nesterov=True,
        batch_size=16,
        epochs=3,
        examples=160,
        train_mode=False,
        seed=0,
        stream=0,
    )
    trained, losses = retraining.retrain(student, teacher, plan, tiny_data)
    images = next(data.preprocessed_batches(tiny_data, "validation", 64, 64))["image"]

    def distance(variables):
        moved = dataclasses.replace(student, variables=variables)
        (_, target), (_, got) = (
            retraining.target_values(teacher, images, "conv2", train=False),
            retraining.target_values(moved, images, "conv2", train=False),
        )
        return float(jnp.mean((target[0] - got[0]) ** 2))

    assert losses["updates"] == 30
    assert distance(trained) < 0.8 * distance(student.variables)


def test_complete_retraining_trains_every_layer(small_vgg, tiny_data):
    _, variables = small_vgg
    result = progressive_prune(
        config(layers=("conv1",), retraining="complete", learning_rates=((0, 0.05),)),
        "vgg_small",
        variables,
        tiny_data,
    )
    assert result.history[0]["target_group"] is None
    assert result.history[0]["loss"]["updates"] == 2
    for layer in ("conv6", "fc1", "head"):
        assert not np.array_equal(
            result.variables["params"][layer]["kernel"], variables["params"][layer]["kernel"]
        )


@pytest.mark.parametrize("criterion", ["l1", "apoz", "taylor", "random"])
def test_any_registered_criterion_chooses_the_kernels(small_vgg, tiny_data, criterion):
    _, variables = small_vgg
    result = progressive_prune(
        config(criterion=criterion, layers=("conv1", "conv3"), retraining="none"),
        "vgg_small",
        variables,
        tiny_data,
    )
    assert [r["kernels_after"] for r in result.history] == [3, 3]
    assert result.widths["conv1"] == result.widths["conv3"] == 3
    if criterion == "l1":
        kernel = np.asarray(variables["params"]["conv1"]["kernel"])
        reference = np.abs(kernel).reshape(-1, 4).sum(0)
        assert result.history[0]["removed"] == [int(np.argmin(reference))]


def test_a_whole_run_follows_the_layers_and_reports_cost(small_vgg, tiny_data):
    _, variables = small_vgg
    result = progressive_prune(config(eval_examples=64), "vgg_small", variables, tiny_data)
    assert [r["group"] for r in result.history] == [f"conv{i}" for i in range(1, 7)]
    assert [r["target_group"] for r in result.history][-1] == "fc1"
    assert all(result.widths[f"conv{i}"] == 3 for i in range(1, 7))
    macs = [r["macs"] for r in result.history]
    assert macs == sorted(macs, reverse=True) and macs[-1] == result.summary["final"]["macs"]
    assert result.summary["final"]["remaining"]["macs"] < 1.0
    assert all(0.0 <= r["validation"]["accuracy"] <= 1.0 for r in result.history)


def test_reinit_head_and_final_finetune(small_vgg, tiny_data):
    _, variables = small_vgg
    fresh = reinit_head(variables, "head", seed=3)
    assert not np.array_equal(
        fresh["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )
    assert not np.asarray(fresh["params"]["head"]["bias"]).any()
    chex.assert_trees_all_equal(fresh["params"]["fc1"], variables["params"]["fc1"])
    with pytest.raises(ValueError, match="head_layer"):
        reinit_head(variables, "classifier", seed=0)
    result = progressive_prune(
        config(
            layers=("conv1",),
            retraining="none",
            final_finetune_epochs=1,
            final_examples=64,
            final_batch_size=32,
            reinit_head=True,
        ),
        "vgg_small",
        variables,
        tiny_data,
    )
    assert result.summary["finetune"]["loss"]["updates"] == 2


def test_a_user_model_runs_through_rebuild_and_resumes(tmp_path, tiny_data):
    x = jnp.zeros((1, 28, 28, 1))
    model = ConvBNDense(widths=(("head", 10),))
    variables = model.init(jax.random.key(0), x)

    def rebuild_user(widths):
        return ConvBNDense(widths=tuple(sorted(widths.items()))).apply

    first = progressive_prune(config(), rebuild_user, variables, tiny_data, workdir=tmp_path)
    assert [r["target_group"] for r in first.history] == ["conv1", "fc"]
    assert (first.widths["conv0"], first.widths["conv1"]) == (4, 6)  # round(1.5), round(2.0)
    again = progressive_prune(config(), rebuild_user, variables, tiny_data, workdir=tmp_path)
    chex.assert_trees_all_equal(again.variables, first.variables)
    assert again.history == first.history
    with pytest.raises(checkpoint.CheckpointError, match="another ProgressiveConfig"):
        progressive_prune(config(ratio=0.5), rebuild_user, variables, tiny_data, workdir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The subjective criterion and its stand-in


def test_a_selection_file_is_replayed(tmp_path, small_vgg, tiny_data):
    _, variables = small_vgg
    path = write_selection(
        tmp_path / "chosen.json",
        selection_document({"conv1": [0, 2], "conv2": [3]}, {"conv1": 4, "conv2": 4}),
    )
    chosen = config(criterion="subjective", selection=str(path), layers=("conv1", "conv2"))
    result = progressive_prune(
        dataclasses.replace(chosen, retraining="none"), "vgg_small", variables, tiny_data
    )
    assert [r["removed"] for r in result.history] == [[0, 2], [3]]
    assert [r["chosen_by"] for r in result.history] == ["person", "person"]
    np.testing.assert_array_equal(result.keep["conv1"], [1, 3])
    with pytest.raises(SelectionError, match="no choice for layer 'conv3'"):
        progressive_prune(
            dataclasses.replace(chosen, layers=("conv3",)), "vgg_small", variables, tiny_data
        )
    wrong = write_selection(
        tmp_path / "wrong.json", selection_document({"conv1": [0]}, {"conv1": 8})
    )
    with pytest.raises(SelectionError, match="make the selection again"):
        progressive_prune(
            dataclasses.replace(chosen, selection=str(wrong), layers=("conv1",)),
            "vgg_small",
            variables,
            tiny_data,
        )


def test_the_interactive_mode_writes_the_page_and_waits_for_the_choice(
    tmp_path, small_vgg, tiny_data
):
    _, variables = small_vgg
    folder = tmp_path / "selection"

    def answer():
        # What a person does: wait for the page, then export a choice next to it.
        for _ in range(2000):
            pages = list(folder.glob("*.html")) if folder.is_dir() else []
            if pages:
                document = selection_document({"conv1": [1]}, {"conv1": 4})
                write_selection(pages[0].with_suffix(".json"), document)
                return
            threading.Event().wait(0.05)

    thread = threading.Thread(target=answer)
    thread.start()
    result = progressive_prune(
        config(
            criterion="subjective",
            wait_for_selection=True,
            poll_seconds=0.05,
            selection_timeout_s=120,
            layers=("conv1",),
            retraining="none",
        ),
        "vgg_small",
        variables,
        tiny_data,
        workdir=tmp_path,
    )
    thread.join()
    page = next(folder.glob("*.html"))
    assert "conv1" in page.read_text()
    assert result.history[0]["removed"] == [1]


def test_the_standin_removes_the_count_it_is_asked_for(small_vgg, tiny_data):
    _, variables = small_vgg
    result = progressive_prune(
        config(criterion="standin", layers=("conv1", "conv2"), retraining="none"),
        "vgg_small",
        variables,
        tiny_data,
    )
    assert [len(r["removed"]) for r in result.history] == [1, 1]
    assert all(r["chosen_by"] == standin.CHOSEN_BY for r in result.history)


# ---------------------------------------------------------------------------------------------
# The runner `jaxprune prune --method progressive` calls


def test_run_writes_a_loadable_pruned_model_and_the_summary(tmp_path, small_vgg, tiny_data):
    model, variables = small_vgg
    report = run_progressive.run(
        config(layers=("conv1", "conv2")),
        "vgg_small",
        model,
        variables,
        tiny_data,
        tmp_path,
        progress=False,
    )
    pruned, pruned_variables, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert meta["method"] == "progressive" and meta["criterion"] == "oracle_loss"
    assert report["widths"]["conv1"] == report["widths"]["conv2"] == 3
    assert report["keep"]["conv1"] == meta["keep"]["conv1"]
    summary = report["summary"]
    assert {"base", "final", "validation", "test"} <= set(summary)
    assert summary["final"]["macs"] < summary["base"]["macs"]
    assert summary["final"]["remaining"]["channels"] == pytest.approx(6 / 8)
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    json.dumps(report)
    for kind, help_text, paths in run_progressive.FLAGS.values():
        assert kind in (int, float, str, bool) and help_text and paths
        for path in paths:
            assert path.split(".")[0] == "progressive"
            assert path.split(".")[1] in {f.name for f in dataclasses.fields(ProgressiveConfig)}


def test_channel_graph_names_are_stable_after_each_layer(small_vgg):
    _, variables = small_vgg
    graph = channel_graph(rebuild(SMALL_WIDTHS), variables, jnp.zeros((1, 28, 28, 1)))
    assert list(graph.names) == [f"conv{i}" for i in range(1, 7)] + ["fc1"]
