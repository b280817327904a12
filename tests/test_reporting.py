"""What `jaxprune prune` reports and writes: the summary table, the cost, and the pruned model
file read back for a zoo model and for a model of your own (the documented recipe)."""

from __future__ import annotations

import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from user_models import CompactHardCoded, init_linen

import jaxprune as jp
from jaxprune import checkpoint
from jaxprune.commands import prune as prune_command
from jaxprune.commands.model_spec import LoadedModel
from jaxprune.model import Model

LENET = Path(__file__).resolve().parent.parent / "jaxprune/pretrained/lenet5_fashion_mnist.msgpack"


def report(base_accuracy: float = 0.9, pruned_accuracy: float = 0.85) -> dict:
    def metrics(accuracy):
        split = {"accuracy": accuracy, "loss": 0.3, "kappa": 0.8, "count": 10}
        return {"validation": split, "test": split}

    return {
        "job": {
            "method": "oneshot",
            "data": {"name": "fashion_mnist"},
            "oneshot": {"criterion": "l1"},
        },
        "model": {"spec": "lenet5"},
        "cost": {
            "before": {"flops": 2e6, "macs": 1e6, "params": 4e4},
            "after": {"flops": 1e6, "macs": 5e5, "params": 3e4},
            "remaining": {"flops": 0.5, "macs": 0.5, "params": 0.75},
        },
        "metrics": {"base": metrics(base_accuracy), "pruned": metrics(pruned_accuracy)},
        "widths": {"before": {"conv1": 6, "conv2": 16}, "after": {"conv1": 3, "conv2": 16}},
    }


def test_the_summary_shows_base_and_pruned_side_by_side(capsys):
    prune_command.print_report(report())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "lenet5 on fashion_mnist, pruned by oneshot / l1"
    assert lines[1].split() == ["base", "pruned", "left"]
    assert lines[2].split() == ["FLOPs", "2.000M", "1.000M", "50.0%"]
    assert lines[4].split() == ["parameters", "0.040M", "0.030M", "75.0%"]
    assert lines[5].split() == ["validation", "accuracy", "90.00%", "85.00%"]
    assert lines[-1] == "kernels kept: conv1 3/6"


def test_cost_counts_before_and_after_with_the_fraction_left():
    module, variables, _ = checkpoint.load_model_file(LENET)
    model = Model.linen(module, jnp.zeros((1, 28, 28, 1)), variables=variables)
    graph = jp.channel_graph(module.apply, variables, jnp.zeros((1, 28, 28, 1)), train=False)
    pruned = jp.prune(variables, graph, {"conv2": np.arange(8)})
    cost = prune_command._cost(
        model, variables, model.with_apply_fn(pruned.apply_fn), pruned.variables
    )
    assert cost["after"]["macs"] < cost["before"]["macs"]
    assert cost["remaining"]["params"] == pytest.approx(
        cost["after"]["params"] / cost["before"]["params"]
    )


def fake_result(variables, keep):
    return types.SimpleNamespace(variables=variables, keep=keep)


def test_a_zoo_models_pruned_file_is_a_zoo_model_file(tmp_path):
    module, variables, _ = checkpoint.load_model_file(LENET)
    x = jnp.zeros((1, 28, 28, 1))
    graph = jp.channel_graph(module.apply, variables, x, train=False)
    pruned = jp.prune(variables, graph, {"conv1": [0, 2, 4]})
    loaded = LoadedModel(
        Model.linen(module, x, variables=variables), variables, "lenet5", "lenet5", True
    )
    job = prune_command.PruneJob(model="lenet5")
    dataset = types.SimpleNamespace(num_classes=10, image_shape=(28, 28, 1))
    path = prune_command.save_pruned(
        tmp_path / "pruned.msgpack",
        job,
        loaded,
        fake_result(pruned.variables, pruned.keep),
        dataset,
    )
    small, small_variables, meta = prune_command.load_pruned(path)
    assert meta["keep"]["conv1"] == [0, 2, 4] and meta["model"] == "lenet5"
    np.testing.assert_allclose(
        small(small_variables, x), pruned.apply_fn(pruned.variables, x, train=False), atol=1e-5
    )


def test_your_models_pruned_file_reloads_through_jaxprune_prune(tmp_path):
    module, variables, x, _ = init_linen(CompactHardCoded)
    model = Model.linen(module, x, variables=variables)
    graph = jp.channel_graph(module.apply, variables, x, train=False)
    pruned = jp.prune(variables, graph, {"Conv_0": np.arange(0, 32, 2)})
    loaded = LoadedModel(model, variables, "models.py:make", None, True)
    job = prune_command.PruneJob(model="models.py:make")
    path = prune_command.save_pruned(
        tmp_path / "pruned.msgpack", job, loaded, fake_result(pruned.variables, pruned.keep), None
    )
    with pytest.raises(checkpoint.CheckpointError, match="outside the zoo"):
        checkpoint.load_model_file(path)

    # The recipe of the module docstring: the base model, its graph, prune with the kept
    # channels, read the variables into the pruned shapes.
    again = jp.prune(variables, graph, {"Conv_0": np.arange(0, 32, 2)})
    read = checkpoint.load_variables(path, again.variables)
    expected = pruned.apply_fn(pruned.variables, x, train=False)
    np.testing.assert_allclose(again.apply_fn(read, x, train=False), expected, atol=1e-5)
    small, small_variables, meta = prune_command.load_pruned(path, base=(model, variables))
    assert meta["keep"]["Conv_0"] == list(range(0, 32, 2))
    np.testing.assert_allclose(small(small_variables, x), expected, atol=1e-5)
