"""The command line: config files, overrides, the graph command."""

import dataclasses

import pytest

from jaxprune.cli import apply_overrides, load_config, main
from jaxprune.train_job import TrainConfig


def test_overrides_reach_nested_fields():
    config = apply_overrides(
        TrainConfig(), ["epochs=3", "optimizer.learning_rate=0.05", "data.train_examples=None"]
    )
    assert config.epochs == 3 and config.optimizer.learning_rate == 0.05
    assert config.data.train_examples is None
    with pytest.raises(SystemExit, match="has no field 'lr'"):
        apply_overrides(TrainConfig(), ["optimizer.lr=1"])
    with pytest.raises(SystemExit, match="key=value"):
        apply_overrides(TrainConfig(), ["epochs"])


def test_experiment_configs_load():
    for name in ("base_lenet5", "base_vgg_small"):
        config = load_config(f"experiments/{name}.py")
        assert dataclasses.is_dataclass(config) and config.model in name


def test_graph_command_prints_the_groups(capsys):
    assert main(["--no-compilation-cache", "graph", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "fc2" in out and "head (the model output)" in out
