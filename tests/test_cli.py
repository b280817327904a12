"""The command line: config files, overrides, the graph command."""

import dataclasses

import pytest

from jaxprune.cli import apply_overrides, load_config, main
from jaxprune.commands.config import UsageError
from jaxprune.train_job import TrainConfig


def test_overrides_reach_nested_fields():
    config = apply_overrides(
        TrainConfig(), ["epochs=3", "optimizer.learning_rate=0.05", "data.train_examples=None"]
    )
    assert config.epochs == 3 and config.optimizer.learning_rate == 0.05
    assert config.data.train_examples is None
    with pytest.raises(UsageError, match="has no field 'lr'"):
        apply_overrides(TrainConfig(), ["optimizer.lr=1"])
    with pytest.raises(UsageError, match="key=value"):
        apply_overrides(TrainConfig(), ["epochs"])
    with pytest.raises(UsageError, match=r"epochs='abc': expected an integer"):
        apply_overrides(TrainConfig(), ["epochs=abc"])
    with pytest.raises(UsageError, match=r"optimizer.learning_rate=True: expected a number"):
        apply_overrides(TrainConfig(), ["optimizer.learning_rate=True"])
    assert (
        apply_overrides(TrainConfig(), ["optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0
    )


def test_experiment_configs_load():
    for name in ("base_lenet5", "base_vgg_small"):
        config = load_config(f"experiments/{name}.py")
        assert dataclasses.is_dataclass(config) and config.model in name


def test_graph_command_prints_the_groups(capsys):
    assert main(["--no-compilation-cache", "graph", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "fc2" in out and "head (the model output)" in out


@pytest.mark.slow
def test_graph_reads_your_own_model_from_a_file(capsys):
    for name, first in (("make_linen", "Conv_0"), ("make_nnx", "conv1"), ("bare_module", "Conv_0")):
        assert (
            main(["--no-compilation-cache", "graph", "--model", f"tests/cli_models.py:{name}"]) == 0
        )
        out = capsys.readouterr().out
        assert first in out, out


def test_errors_are_one_line_with_the_fix_and_debug_shows_the_traceback(capsys):
    assert main(["graph", "--model", "tests/cli_models.py:not_a_model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model tests/cli_models.py:not_a_model")
    assert "return (module, variables)" in err[0]
    assert main(["graph", "--model", "resnet99"]) == 1
    assert "is not a zoo model" in capsys.readouterr().err
    with pytest.raises(UsageError):
        main(["--debug", "graph", "--model", "tests/cli_models.py:not_a_model"])


def test_ctrl_c_leaves_one_line_and_the_workdir(monkeypatch, capsys, tmp_path):
    import jaxprune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert main(["train", "--workdir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted; {tmp_path} is kept: run the same command to resume."


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["train", "--workdir=w"],
        ["score"],
        ["inspect"],
        ["prune", "--workdir=w"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_long_running_command_takes_no_progress(argv):
    from jaxprune.cli import build_parser

    args = build_parser().parse_args([*argv, "--no-progress"])
    assert getattr(args, "no_progress", False) or getattr(args, "progress", True) is False
