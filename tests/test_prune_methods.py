"""`jaxprune prune` end to end: every method through the one generic path, on a model of your
own (a file with hard-coded widths) and on the zoo's LeNet-5.

Each method's own tests pin its formulas and resume; these check the command: flags reach the
method's config, everything is checked before data loads, the workdir belongs to one run (the
same command resumes, other settings are refused by name), and ``pruned.msgpack`` is the final
model whose metrics are those of ``result.json``.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxprune import checkpoint, data, train
from jaxprune.cli import main
from jaxprune.commands import prune as prune_command
from jaxprune.graph import channel_graph
from jaxprune.methods.registry import METHODS
from jaxprune.surgery import prune

# A CNN written without jaxprune in mind: widths typed in, BatchNorm, a train flag of its own
# name.
USER_MODEL = textwrap.dedent(
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp


    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x, training: bool = False):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(12, (3, 3), strides=(2, 2))(x))
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(10)(x)


    def make_cnn(input_shape):
        module = SmallCNN()
        variables = module.init(jax.random.key(0), jnp.zeros((1, *input_shape)))
        return module, variables
    """
)
# Small splits: 256 training, 128 validation and 128 test images.
DATA = [
    "--set=data.train_examples=256",
    "--set=data.validation_examples=128",
    "--set=data.test_examples=128",
]
# method -> flags of a tiny run.
TINY = {
    "oneshot": [
        "--oneshot.ratio=0.5",
        "--oneshot.score-batches=1",
        "--set=oneshot.finetune.epochs=1",
    ],
    "iterative": [
        "--iterative.target-channels=0.7",
        "--iterative.channels-per-step=3",
        "--iterative.updates-per-step=2",
        "--iterative.batch-size=32",
        "--iterative.eval-examples=64",
    ],
    "progressive": [
        "--progressive.criterion=l1",
        "--progressive.ratio=0.25",
        "--progressive.retrain-examples=64",
        "--progressive.score-examples=64",
        "--progressive.eval-examples=64",
    ],
    "blending": [
        "--blending.criterion=l1,fpgm,apoz,activation_mean",
        "--blending.ratio=0.25",
        "--blending.score-examples=64",
        "--blending.fitness-examples=64",
        "--set=blending.evolution.population=4",
        "--set=blending.evolution.generations=2",
        "--set=blending.finetune=None",
    ],
    "functional": [
        "--functional.ratio=0.25",
        "--functional.score-examples=64",
        "--functional.representative=centroid",
        "--set=functional.visualization.steps=4",
    ],
}


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "small_cnn.py"
    path.write_text(USER_MODEL)
    return f"{path}:make_cnn"


def prune_argv(method: str, model: str, workdir: Path, *extra: str) -> list[str]:
    return [
        "prune",
        f"--method={method}",
        f"--model={model}",
        f"--workdir={workdir}",
        "--no-progress",
        *DATA,
        *TINY[method],
        *extra,
    ]


def test_flags_are_each_methods_config_fields_one_name_each():
    parser = prune_command.add_command(
        __import__("argparse").ArgumentParser().add_subparsers(dest="command")
    )
    args = parser.parse_args(
        ["--workdir=w", "--method=blending", "--blending.ratio=0.3", "--oneshot.ratio=0.2"]
    )
    job = prune_command.job_from_args(args)
    assert job.method == "blending" and job.blending.ratio == 0.3 and job.oneshot.ratio == 0.2
    assert job.functional == prune_command.PruneJob().functional  # nothing else changed
    text = parser.format_help()
    for name in METHODS:
        assert f"--method {name}" in text and f"--{name}.seed" in text
    assert "(default: 0.5)" in text  # defaults are shown
    with pytest.raises(SystemExit):
        parser.parse_args(["--workdir=w", "--ratio=0.5"])  # no flag sets two methods' fields


def check_run(workdir: Path, method: str, spec: str) -> dict:
    """The report's shape, and a pruned model file that reloads with the report's accuracy."""
    report = json.loads((workdir / "result.json").read_text())
    assert report["job"]["method"] == method == report["method"]["name"]
    assert report["model"]["spec"] == spec
    before, after = report["widths"]["before"], report["widths"]["after"]
    assert set(report["keep"]) <= set(before)
    assert all(after[g] == len(report["keep"][g]) for g in report["keep"])
    assert sum(after.values()) < sum(before.values())
    cost = report["cost"]
    for key in ("flops", "macs", "params"):
        assert cost["after"][key] < cost["before"][key]
        assert cost["remaining"][key] == pytest.approx(cost["after"][key] / cost["before"][key])
    for model in ("base", "pruned"):
        for split in ("validation", "test"):
            metrics = report["metrics"][model][split]
            assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["count"] == 128
    assert report["devices"]

    # The method's live metrics (in its folder of the workdir): one record per step, in order,
    # ending with the run's result.
    logs = workdir / method
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and records[-1]["kind"] == "result"
    after = report["summary"]["validation"]["after"]
    assert records[-1]["accuracy"] == pytest.approx(after["accuracy"])
    assert records[-1]["flops_left"] == pytest.approx(cost["remaining"]["flops"])
    kinds = {r["kind"] for r in records}
    expected = {"iterative": "prune", "progressive": "layer", "blending": "search"}
    assert expected.get(method, "result") in kinds
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))

    model, variables, meta = prune_command.load_pruned(workdir / "pruned.msgpack")
    assert meta["keep"] == report["keep"] and meta["method"] == method
    dataset = data.load(data.DataConfig(**report["job"]["data"]))
    test = train.evaluate(model, variables, data.preprocessed_batches(dataset, "test", 128))
    assert test["accuracy"] == report["metrics"]["pruned"]["test"]["accuracy"]
    return report


def test_oneshot_on_your_own_model_resumes_and_refuses_other_settings(tmp_path, user_model, capsys):
    workdir = tmp_path / "run"
    argv = prune_argv("oneshot", user_model, workdir)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pruned by oneshot / l1" in out and "test accuracy" in out
    report = check_run(workdir, "oneshot", user_model)
    assert report["job"]["oneshot"]["finetune"]["epochs"] == 1.0
    assert report["keep"].keys() == {"Conv_0", "Conv_1"}
    assert [len(k) for k in report["keep"].values()] == [4, 6]

    # The file is the fine-tuned model: its parameters are not the pruned base's.
    from jaxprune.commands.model_spec import load_model

    base = load_model(user_model, input_shape=(28, 28, 1), num_classes=10, dataset="")
    graph = channel_graph(
        base.model.apply_fn, base.variables, base.model.example_input, **base.model.eval_kwargs
    )
    pruned = prune(base.variables, graph, report["keep"])
    saved = checkpoint.load_variables(workdir / "pruned.msgpack", pruned.variables)
    assert not np.allclose(
        saved["params"]["Conv_1"]["kernel"], pruned.variables["params"]["Conv_1"]["kernel"]
    )

    # The same command again reports the finished run; nothing is recomputed.
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert json.loads((workdir / "result.json").read_text()) == report
    assert "pruned by oneshot" in capsys.readouterr().out

    # Another ratio in the same workdir is refused, naming the field, and nothing is lost.
    changed = prune_argv("oneshot", user_model, workdir, "--oneshot.ratio=0.25")
    assert main(changed) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    assert "oneshot.ratio: 0.5 -> 0.25" in error
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_iterative_on_your_own_model(tmp_path, user_model):
    assert main(prune_argv("iterative", user_model, tmp_path)) == 0
    report = check_run(tmp_path, "iterative", user_model)
    assert report["summary"]["method"]["stop_reason"] == "target"
    kept = sum(report["widths"]["after"].values())
    assert kept <= 0.7 * sum(report["widths"]["before"].values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["progressive", "blending", "functional"])
def test_paper_methods_on_the_zoo_lenet(tmp_path, method, capsys):
    argv = prune_argv(method, "lenet5", tmp_path)
    assert main(argv) == 0
    assert f"pruned by {method}" in capsys.readouterr().out
    report = check_run(tmp_path, method, "lenet5")
    module, variables, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert meta["keep"] == report["keep"]
    assert variables["params"]["conv2"]["kernel"].shape[-1] == report["widths"]["after"]["conv2"]
    assert (tmp_path / method / "result.json").is_file()  # the method's own run


@pytest.mark.slow
def test_functional_on_your_own_model(tmp_path, user_model):
    assert main(prune_argv("functional", user_model, tmp_path)) == 0
    check_run(tmp_path, "functional", user_model)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set=oneshot.ratio=abc"], "oneshot.ratio='abc': expected a number"),
        (["--oneshot.criterion=nope"], "criterion 'nope' is not a registered criterion"),
        (["--set=method='magic'"], "method 'magic' is unknown"),
        (["--set=oneshot.colour=1"], "OneShotConfig has no field 'colour'"),
        (["--model=nowhere.py:make"], "nowhere.py does not exist"),
    ],
)
def test_bad_settings_are_one_line_before_any_data_loads(
    tmp_path, user_model, monkeypatch, capsys, extra, message
):
    def no_data(*args, **kwargs):
        raise AssertionError("data.load was called")

    monkeypatch.setattr(data, "load", no_data)
    assert main(prune_argv("oneshot", user_model, tmp_path / "run", *extra)) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert message in error
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_config_file_gives_the_job(tmp_path):
    config = tmp_path / "job.py"
    config.write_text(
        "from jaxprune.commands.prune import PruneJob\n"
        "from jaxprune.methods.oneshot import OneShotConfig\n"
        "def get_config():\n"
        "    return PruneJob(method='oneshot', model='lenet5',"
        " oneshot=OneShotConfig(criterion='fpgm', ratio=0.25))\n"
    )
    parser = prune_command.add_command(
        __import__("argparse").ArgumentParser().add_subparsers(dest="command")
    )
    args = parser.parse_args(
        [f"--config={config}", "--workdir=w", "--oneshot.ratio=0.3", "--set=oneshot.seed=2"]
    )
    job = prune_command.job_from_args(args)
    assert job.model == "lenet5" and job.oneshot.criterion == "fpgm"
    assert job.oneshot.ratio == 0.3 and job.oneshot.seed == 2


def test_the_run_identity_is_the_settings_and_the_base_weights_not_their_path():
    from types import SimpleNamespace

    from jaxprune.commands.prune import PruneJob, job_identity

    weights = SimpleNamespace(variables={"params": {"w": np.ones(3, np.float32)}})
    other = SimpleNamespace(variables={"params": {"w": np.zeros(3, np.float32)}})
    job = PruneJob(variables="/data/a/model.msgpack")
    moved = dataclasses.replace(job, variables="/elsewhere/copy.msgpack")
    assert job_identity(job, weights) == job_identity(moved, weights)
    assert job_identity(job, weights) != job_identity(job, other)
    retuned = dataclasses.replace(job, oneshot=dataclasses.replace(job.oneshot, ratio=0.25))
    assert job_identity(job, weights) != job_identity(retuned, weights)
