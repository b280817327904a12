"""`jaxprune prune --method ...` end to end on the shipped LeNet-5, for the paper methods.

Each method's own tests pin its formulas and resume; these check the command line wiring: the
flags reach the method's config, the workdir gets a loadable pruned model and a report of the
common shape, and a second run of the same command resumes instead of starting over.
"""

import argparse
import json
from pathlib import Path

import pytest

from jaxprune import checkpoint
from jaxprune.commands import prune as prune_command
from jaxprune.models import widths_from_params

LENET = Path(prune_command.PRETRAINED) / "lenet5_fashion_mnist.msgpack"
COMMON = [
    f"--model-file={LENET}",
    "--set=data.validation_examples=128",
    "--set=data.test_examples=128",
    "--no-progress",
]
# method -> its flags for a tiny run, and a check of the job the flags built.
METHOD_ARGS = {
    "progressive": (
        [
            "--criterion=l1",
            "--ratio=0.25",
            "--retrain-examples=64",
            "--score-examples=64",
            "--retraining=complete",
            "--set=progressive.eval_examples=128",
        ],
        lambda job: job.progressive.ratio == 0.25 and job.progressive.retraining == "complete",
    ),
    "blending": (
        [
            "--criterion=l1,fpgm,apoz,taylor_bn_gamma",
            "--ratio=0.25",
            "--population=4",
            "--generations=2",
            "--fitness-examples=64",
            "--score-examples=64",
        ],
        lambda job: job.blending.evolution.population == 4 and job.blending.ratio == 0.25,
    ),
    "functional": (
        [
            "--ratio=0.25",
            "--visualization-steps=4",
            "--score-examples=64",
            "--representative=centroid",
        ],
        lambda job: job.functional.ratio == 0.25 and job.functional.representative == "centroid",
    ),
}


def run_prune_command(argv: list[str]) -> tuple[int, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="jaxprune")
    prune_command.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args), args


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_prune_command_runs_each_paper_method(tmp_path, method, capsys):
    extra, job_is_right = METHOD_ARGS[method]
    argv = ["prune", f"--method={method}", f"--workdir={tmp_path}", *COMMON, *extra]
    code, args = run_prune_command(argv)
    assert code == 0
    assert job_is_right(prune_command.job_from_args(args))
    model, variables, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["job"]["method"] == method == meta["method"]
    widths = widths_from_params(variables["params"])
    assert report["widths"] == widths
    assert widths["conv1"] + widths["conv2"] < 6 + 16
    summary = report["summary"]
    assert summary["final"]["macs"] < summary["base"]["macs"]
    assert 0.0 < summary["test"]["accuracy"] <= 1.0
    assert f"pruned by {method}" in capsys.readouterr().out

    # The same command again finds the finished run in its workdir.
    code, _ = run_prune_command(argv)
    assert code == 0
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["widths"] == report["widths"] and again["keep"] == report["keep"]


def test_an_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        run_prune_command(["prune", "--method=magic", f"--workdir={tmp_path}"])
