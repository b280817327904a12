"""Progressive simplification (Osaku et al. 2021) under the method contract: kernel choice,
freezing, retraining, the pruned program after each layer, the run directory."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import criteria, data
from jaxprune.gates import gated_call
from jaxprune.methods import progressive_choice as choice
from jaxprune.methods import progressive_retrain as retraining
from jaxprune.methods import standin
from jaxprune.methods.contract import DatasetData
from jaxprune.methods.progressive import ProgressiveConfig, progressive_prune, removal_count
from jaxprune.methods.selection_file import SelectionError, selection_document, write_selection
from jaxprune.model import Model
from jaxprune.models import build_model
from jaxprune.run import RunMismatchError
from jaxprune.surgery import keep_to_masks

SMALL_WIDTHS = {f"conv{i}": 4 for i in range(1, 7)} | {"fc1": 8}


@pytest.fixture(scope="module")
def tiny_data():
    dataset = data.load(
        data.DataConfig(train_examples=320, validation_examples=128, test_examples=128)
    )
    return DatasetData(dataset, batch_size=32)


@pytest.fixture(scope="module")
def small_vgg():
    """A narrow VGG-small (4 kernels per conv, dropout 0.5) with random weights and
    non-trivial BN statistics, as a `Model` and its variables."""
    module = build_model("vgg_small", 10, SMALL_WIDTHS)
    x = jnp.zeros((1, 28, 28, 1))
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    stats = jax.tree.map(lambda v: v + 0.1, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    return Model.linen(module, x, variables=variables), variables


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


def run(small_vgg, tiny_data, **changes):
    model, variables = small_vgg
    return progressive_prune(model, variables, tiny_data, config(**changes), progress=False)


def first_validation_batch(tiny_data, size=32):
    return next(retraining.rebatch(tiny_data.validation(), size, size))


# ---------------------------------------------------------------------------------------------
# Pure pieces against NumPy references


@pytest.mark.parametrize(
    "changes, index, size, expected",
    [
        ({"ratio": 0.05}, 0, 32, 1),  # floor(1.6), as the authors' int(p * n)
        ({"ratio": 0.05, "rounding": "nearest"}, 0, 32, 2),  # round(1.6)
        ({"ratio": 0.05}, 0, 60, 3),  # 0.05 * 60 is 2.9999999999999996 in floating point
        ({"ratio": 0.05}, 0, 16, 0),
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
    np.testing.assert_array_equal(choice.lowest(scores, 3), [0, 1, 3])
    np.testing.assert_array_equal(
        choice.lowest(scores, 3), np.sort(np.argsort(scores, kind="stable")[:3])
    )
    with pytest.raises(ValueError, match="NaN"):
        choice.lowest(np.array([0.0, np.nan]), 1)


def test_a_layer_normalised_in_blocks_loses_its_lowest_whole_blocks():
    # Blocks of 2, means 0.5, 0.15, 3.0, 0.35.
    scores = np.array([0.9, 0.1, 0.2, 0.1, 3.0, 3.0, 0.3, 0.4])
    np.testing.assert_array_equal(choice.lowest(scores, 2, block=2), [2, 3])
    np.testing.assert_array_equal(choice.lowest(scores, 3, block=2), [2, 3, 6, 7])  # 1.5 -> 2
    np.testing.assert_array_equal(choice.lowest(scores, 1, block=2), [2, 3])  # at least one
    assert len(choice.lowest(scores, 8, block=2)) == 6  # never the last block
    assert len(choice.lowest(scores, 0, block=2)) == 0
    choice.check_whole_blocks(np.array([2, 3, 6, 7]), 2, "conv")
    with pytest.raises(ValueError, match="splits block 1 .kernels 2-3."):
        choice.check_whole_blocks(np.array([0, 1, 2]), 2, "conv")


def test_learning_rate_breakpoints_follow_the_paper():
    rates = [retraining.learning_rate_for(ProgressiveConfig().learning_rates, i) for i in range(8)]
    assert rates == [1e-5, 1e-6, 1e-6, 1e-7, 1e-7, 1e-7, 1e-8, 1e-8]


def test_rebatch_cuts_and_joins_batches_in_order():
    batches = [{"image": np.arange(n0, n0 + n)[:, None], "label": np.arange(n0, n0 + n)}
               for n0, n in ((0, 5), (5, 3), (8, 7))]  # fmt: skip
    got = list(retraining.rebatch(batches, 4))
    assert [b["label"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    capped = list(retraining.rebatch(batches, 4, limit=9))
    assert [b["label"].tolist() for b in capped] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    scoring = list(retraining.rebatch(batches, 8, limit=13, drop_remainder=False))
    assert [b["label"].tolist() for b in scoring] == [list(range(8)), list(range(8, 13))]
    as_given = list(retraining.rebatch(batches, None, limit=6))
    assert [b["label"].tolist() for b in as_given] == [[0, 1, 2, 3, 4], [5]]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"criterion": "nope"}, "neither a registered criterion"),
        ({"retraining": "partial"}, "retraining="),
        ({"loss": "l1"}, "loss="),
        ({"batch_norm": "train"}, "batch_norm="),
        ({"rounding": "ceil"}, "rounding="),
        ({"final_reinit": "all"}, "final_reinit="),
        ({"ratio": 1.0}, "ratio="),
        ({"count": 1.5}, "count must be an int"),
        ({"per_layer": (0.5, 1.5)}, "fraction 1.5"),
        ({"learning_rates": ((1, 1e-3),)}, "starting at layer 0"),
        ({"complete_learning_rate": 0.0}, "learning rates must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"score_examples": 0}, "score_examples must be >= 1"),
        ({"per_layer": (1, True)}, "int"),
    ],
)
def test_bad_configs_are_refused_with_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveConfig(**changes).check()


def test_inputs_that_only_the_model_and_data_can_check_fail_before_any_work(
    tmp_path, small_vgg, tiny_data
):
    model, variables = small_vgg
    with pytest.raises(ValueError, match="per_layer has 3 entries for the 2 layers"):
        progressive_prune(
            model, variables, tiny_data, config(layers=("conv1", "conv2"), per_layer=(1, 1, 1))
        )
    with pytest.raises(ValueError, match="needs a person's choice"):
        progressive_prune(model, variables, tiny_data, config(criterion="subjective"))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        progressive_prune(
            model,
            variables,
            tiny_data,
            config(criterion="subjective", selection=str(tmp_path / "nowhere.json")),
            workdir=str(tmp_path / "run"),
        )
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    with pytest.raises(TypeError, match="Model.linen"):
        progressive_prune(model.apply_fn, variables, tiny_data, config())


def test_the_target_of_layer_l_plus_1_is_after_its_bn_relu_and_pooling(small_vgg, tiny_data):
    model, variables = small_vgg
    network = retraining.Network.of(model, variables)
    images = first_validation_batch(tiny_data, 4)["image"]
    (target,) = retraining.target_values(network, variables, images, "conv2")

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
    network = retraining.Network.of(model, variables)
    assert retraining.next_group(network.graph, "conv2") == "conv3"
    assert retraining.next_group(network.graph, "conv6") == "fc1"
    trainable = retraining.trainable_for(network, "conv3")
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


@pytest.mark.slow
def test_the_objective_criterion_removes_the_kernels_whose_removal_leaves_the_lowest_loss(
    small_vgg, tiny_data
):
    model, variables = small_vgg
    result = run(small_vgg, tiny_data, layers=("conv2",), retraining="none")
    network = retraining.Network.of(model, variables)
    batch = first_validation_batch(tiny_data)
    reference = criteria.score(
        "oracle_loss", criteria.ScoringContext(model.apply_fn, network.graph), variables, [batch]
    )["conv2"]
    record = result.history[0]
    assert record["removed"] == [int(np.argmin(reference))]
    np.testing.assert_allclose(record["removed_scores"], [reference.min()], rtol=1e-6)
    kept = result.keep["conv2"]
    np.testing.assert_array_equal(kept, np.setdiff1d(np.arange(4), record["removed"]))
    assert set(result.keep) == {"conv2"}
    # Without retraining the result is the surgery of the base model...
    np.testing.assert_array_equal(
        result.variables["params"]["conv2"]["kernel"],
        np.asarray(variables["params"]["conv2"]["kernel"])[..., kept],
    )
    np.testing.assert_array_equal(
        result.variables["params"]["conv3"]["kernel"],
        np.asarray(variables["params"]["conv3"]["kernel"])[:, :, kept, :],
    )
    # ...and its model, the pruned program, equals the masked original.
    images = batch["image"]
    masked = gated_call(
        model.apply_fn,
        network.graph,
        variables,
        images,
        keep_to_masks(network.graph, result.keep),
        train=False,
    )
    np.testing.assert_allclose(result.model(result.variables, images), masked, atol=1e-5)
    assert result.graph.names == network.graph.names


def test_frozen_leaves_are_bit_identical_after_progressive_retraining(small_vgg, tiny_data):
    _, variables = small_vgg
    result = run(
        small_vgg, tiny_data, layers=("conv1",), learning_rates=((0, 0.05),), retrain_examples=32
    )
    assert result.history[0]["target_group"] == "conv2"
    assert result.history[0]["loss"]["updates"] == 4
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
                # Layers 1..l+1 (here 1 and 2) train; conv3.., fc1 and the head never change,
                # and no BatchNorm statistics do (frozen by default).
                if index > 2 or collection == "batch_stats":
                    assert not changed, f"{collection}/{layer}/{name} changed"
                    assert leaf.tobytes() == np.asarray(after[name]).tobytes()
                elif name in ("kernel", "scale"):
                    assert changed, f"{collection}/{layer}/{name} did not train"


@pytest.mark.slow
def test_the_mse_retraining_lowers_the_distance_to_the_model_before_pruning(small_vgg, tiny_data):
    model, variables = small_vgg
    teacher = retraining.Network.of(model, variables)
    pruned = run(small_vgg, tiny_data, layers=("conv1",), retraining="none")
    student = retraining.Network.of(pruned.model, pruned.variables)
    plan = retraining.RetrainPlan(
        loss="mse",
        target_group="conv2",
        trainable=retraining.trainable_for(student, "conv2"),
        learning_rate=0.05,
        momentum=0.9,
        nesterov=True,
        epochs=3,
    )
    epochs = retraining.epoch_data(tiny_data, 0, 16, 160)
    trained, losses = retraining.retrain(student, teacher, plan, epochs)
    images = next(retraining.rebatch(tiny_data.validation(), 64, 64))["image"]

    def distance(new):
        (target,) = retraining.target_values(teacher, variables, images, "conv2")
        (got,) = retraining.target_values(student, new, images, "conv2")
        return float(jnp.mean((target - got) ** 2))

    assert losses["updates"] == 30 and len(losses["epoch_loss"]) == 3
    assert distance(trained) < 0.8 * distance(student.variables)


def test_complete_retraining_trains_every_layer(small_vgg, tiny_data):
    _, variables = small_vgg
    result = run(
        small_vgg,
        tiny_data,
        layers=("conv1",),
        retraining="complete",
        complete_learning_rate=0.05,
    )
    assert result.history[0]["target_group"] is None
    assert result.history[0]["loss"]["updates"] == 2
    assert result.history[0]["learning_rate"] == 0.05
    for layer in ("conv6", "fc1", "head"):
        assert not np.array_equal(
            result.variables["params"][layer]["kernel"], variables["params"][layer]["kernel"]
        )


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["l1", "apoz", "taylor", "random"])
def test_any_registered_criterion_chooses_the_kernels(small_vgg, tiny_data, criterion):
    _, variables = small_vgg
    result = run(
        small_vgg, tiny_data, criterion=criterion, layers=("conv1", "conv3"), retraining="none"
    )
    assert [r["kernels_after"] for r in result.history] == [3, 3]
    assert result.variables["params"]["conv3"]["kernel"].shape[-2:] == (4, 3)
    if criterion == "l1":
        kernel = np.asarray(variables["params"]["conv1"]["kernel"])
        reference = np.abs(kernel).reshape(-1, 4).sum(0)
        assert result.history[0]["removed"] == [int(np.argmin(reference))]


@pytest.mark.slow
def test_a_whole_run_follows_the_layers_and_reports_cost(small_vgg, tiny_data):
    result = run(small_vgg, tiny_data, eval_examples=64)
    assert result.method == "progressive"
    assert [r["group"] for r in result.history] == [f"conv{i}" for i in range(1, 7)]
    assert [r["target_group"] for r in result.history][-1] == "fc1"
    assert all(result.keep[f"conv{i}"].size == 3 for i in range(1, 7))
    macs = [r["macs"] for r in result.history]
    assert (
        macs == sorted(macs, reverse=True) and macs[-1] == result.summary["cost"]["after"]["macs"]
    )
    assert result.summary["remaining"]["macs"] < 1.0
    assert all(0.0 <= r["validation"]["accuracy"] <= 1.0 for r in result.history)
    assert result.summary["validation"]["after"]["count"] == 64
    # Each record names the base kernels removed so far in its layer.
    for record in result.history:
        kept = result.keep[record["group"]]
        assert record["removed_base"] == sorted(set(range(4)) - set(kept.tolist()))


@pytest.mark.slow
def test_the_workdir_resumes_the_same_run_and_refuses_another(tmp_path, small_vgg, tiny_data):
    model, variables = small_vgg
    settings = config(layers=("conv1", "conv2"), final_finetune_epochs=1, final_examples=32)
    first = progressive_prune(
        model, variables, tiny_data, settings, workdir=str(tmp_path), progress=False
    )
    assert (tmp_path / "result.json").is_file()
    again = progressive_prune(
        model, variables, tiny_data, settings, workdir=str(tmp_path), progress=False
    )
    chex.assert_trees_all_equal(again.variables, first.variables)
    assert again.history == first.history
    with pytest.raises(RunMismatchError, match=r"config.ratio: 0.25 -> 0.5"):
        progressive_prune(
            model,
            variables,
            tiny_data,
            dataclasses.replace(settings, ratio=0.5),
            workdir=str(tmp_path),
        )
    other = jax.tree.map(lambda a: a * 1.01, variables)
    with pytest.raises(RunMismatchError, match="variables"):
        progressive_prune(model, other, tiny_data, settings, workdir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The subjective criterion and its stand-in


def test_a_selection_file_is_replayed(tmp_path, small_vgg, tiny_data):
    model, variables = small_vgg
    path = write_selection(
        tmp_path / "chosen.json",
        selection_document({"conv1": [0, 2], "conv2": [3]}, {"conv1": 4, "conv2": 4}),
    )
    chosen = config(criterion="subjective", selection=str(path), layers=("conv1", "conv2"))
    result = progressive_prune(
        model, variables, tiny_data, dataclasses.replace(chosen, retraining="none")
    )
    assert [r["removed"] for r in result.history] == [[0, 2], [3]]
    assert [r["chosen_by"] for r in result.history] == ["person", "person"]
    np.testing.assert_array_equal(result.keep["conv1"], [1, 3])
    with pytest.raises(SelectionError, match="no choice for layer 'conv3'"):
        progressive_prune(
            model, variables, tiny_data, dataclasses.replace(chosen, layers=("conv3",))
        )
    wrong = write_selection(
        tmp_path / "wrong.json", selection_document({"conv1": [0]}, {"conv1": 8})
    )
    with pytest.raises(SelectionError, match="make the selection again"):
        progressive_prune(
            model,
            variables,
            tiny_data,
            dataclasses.replace(chosen, selection=str(wrong), layers=("conv1",)),
        )


def test_a_selection_naming_a_layer_the_model_lacks_is_refused_before_any_work(
    tmp_path, small_vgg, tiny_data
):
    model, variables = small_vgg
    path = write_selection(tmp_path / "typo.json", selection_document({"cnov1": [0]}, {"cnov1": 4}))
    with pytest.raises(SelectionError, match=r"does not have: \['cnov1'\]"):
        progressive_prune(
            model, variables, tiny_data, config(criterion="subjective", selection=str(path))
        )


def test_a_chooser_is_asked_for_the_layers_the_file_leaves_out(small_vgg, tiny_data):
    model, variables = small_vgg
    seen = []

    def choose(view):
        seen.append((view.group, view.count, view.size, view.images.shape[0]))
        assert view.model(view.variables, view.images).shape == (4, 10)
        return [view.size - 1], "person"

    result = progressive_prune(
        model,
        variables,
        tiny_data,
        config(criterion="subjective", layers=("conv1", "conv2"), retraining="none"),
        choose=choose,
    )
    assert seen == [("conv1", 1, 4, 4), ("conv2", 1, 4, 4)]
    assert [r["removed"] for r in result.history] == [[3], [3]]

    def greedy(view):
        return list(range(view.size)), "person"

    with pytest.raises(SelectionError, match="removes all 4 kernels"):
        progressive_prune(
            model, variables, tiny_data, config(criterion="subjective"), choose=greedy
        )


def test_the_standin_removes_the_count_it_is_asked_for(small_vgg, tiny_data):
    result = run(small_vgg, tiny_data, criterion="standin", layers=("conv1", "conv2"))
    assert [len(r["removed"]) for r in result.history] == [1, 1]
    assert all(r["chosen_by"] == standin.CHOSEN_BY for r in result.history)
