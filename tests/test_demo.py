"""The main job end to end on the shipped LeNet-5: a `jaxprune prune` job with demo-sized
settings, its table and figures, its resume, and its refusal of other settings."""

import json

import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune.cli import main
from jaxprune.demo import METHOD_SETTINGS, DemoConfig, demo_job, run
from jaxprune.methods.registry import METHODS

# Small splits, no latency timing: the pipeline, not the numbers.
SMALL = {"model": "lenet5", "eval_examples": 256, "finetune_examples": 512, "timing": False}


def test_every_method_has_demo_settings_of_its_own_config():
    assert set(METHOD_SETTINGS) == set(METHODS)
    for method, settings in METHOD_SETTINGS.items():
        config = DemoConfig(method=method, criterion=settings.criterion)
        job = demo_job(config)
        assert isinstance(job.method_config(), METHODS[method].config)
        assert job.method_config().criterion == settings.criterion
        job.method_config().check()


@pytest.mark.slow
def test_demo_prunes_finetunes_reports_and_resumes(tmp_path, capsys):
    config = DemoConfig(workdir=str(tmp_path), ratio=0.5, criterion="l1", **SMALL)
    first = run(config)
    rows = first["results"]
    assert rows["base"]["test_accuracy"] > 0.85  # the shipped base model
    assert rows["pruned"]["macs"] < rows["base"]["macs"] / 2
    for key in ("test_accuracy", "test_kappa", "macs", "params"):
        assert np.isfinite(rows["pruned"][key])
    assert (tmp_path / "summary.png").stat().st_size > 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["results"]["pruned"]["test_accuracy"] == rows["pruned"]["test_accuracy"]
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["job"]["oneshot"]["finetune"]["epochs"] == 1
    assert report["metrics"]["pruned"]["test"]["accuracy"] == rows["pruned"]["test_accuracy"]
    _, _, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert len(meta["keep"]["conv1"]) == 3 and len(meta["keep"]["conv2"]) == 8
    assert "test accuracy" in capsys.readouterr().out

    # Running the same command again reports the finished run.
    second = run(config)
    assert second["results"]["pruned"] == rows["pruned"]

    # Another ratio in the same workdir is refused with the change named.
    argv = ["demo", f"--workdir={tmp_path}", "--ratio=0.25", "--criterion=l1"]
    argv += ["--model=lenet5", "--eval-examples=256", "--finetune-examples=512", "--no-timing"]
    assert main(argv) == 1
    assert "oneshot.ratio: 0.5 -> 0.25" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iterative", "progressive", "blending", "functional"])
def test_demo_reaches_each_method_by_a_flag(tmp_path, method):
    config = DemoConfig(
        workdir=str(tmp_path),
        method=method,
        ratio=0.25,
        finetune_epochs=0,
        channels_per_step=2,
        updates_per_step=2,
        **SMALL,
    )
    report = run(config)
    rows = report["results"]
    assert report["config"]["criterion"] == METHOD_SETTINGS[method].criterion
    assert rows["pruned"]["macs"] < rows["base"]["macs"]
    assert rows["pruned"]["test_accuracy"] > 0.3
    _, _, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert meta["method"] == method and len(meta["keep"]["conv2"]) < 16
    assert (tmp_path / method / "result.json").is_file()
