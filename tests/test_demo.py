"""The main job end to end on the shipped LeNet-5, with a short fine-tuning, and its resume."""

import json

import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune.demo import METHOD_SETTINGS, DemoConfig, run


def test_demo_prunes_finetunes_reports_and_resumes(tmp_path):
    config = DemoConfig(
        model="lenet5",
        workdir=str(tmp_path),
        ratio=0.5,
        finetune_examples=1024,
        criterion="l1",
    )
    first = run(config)
    rows = first["results"]
    assert rows["base"]["test_accuracy"] > 0.9  # the shipped base model
    assert rows["pruned"]["macs"] < rows["base"]["macs"] / 2
    for key in ("test_accuracy", "test_kappa", "macs", "params", "latency_b1_ms"):
        assert np.isfinite(rows["pruned"][key])
    assert (tmp_path / "summary.png").stat().st_size > 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["results"]["pruned"]["test_accuracy"] == rows["pruned"]["test_accuracy"]
    _, pruned_vars, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert len(meta["keep"]["conv1"]) == 3 and len(meta["keep"]["conv2"]) == 8

    # Running the same command again reuses the pruned model and the fine-tuning checkpoints.
    second = run(config)
    assert second["results"]["pruned"]["test_accuracy"] == rows["pruned"]["test_accuracy"]


def test_demo_reaches_the_iterative_method_by_a_flag(tmp_path):
    config = DemoConfig(
        model="lenet5",
        workdir=str(tmp_path),
        method="iterative",
        criterion="taylor",
        ratio=0.3,
        channels_per_step=2,
        updates_per_step=2,
        finetune_epochs=0,
    )
    rows = run(config)["results"]
    assert rows["pruned"]["macs"] < rows["base"]["macs"]
    _, _, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    kept = sum(len(v) for k, v in meta["keep"].items() if k in ("conv1", "conv2"))
    assert kept <= 22 - int(0.3 * 22)


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_demo_reaches_each_paper_method_by_a_flag(tmp_path, method):
    config = DemoConfig(
        model="lenet5", workdir=str(tmp_path), method=method, ratio=0.25, finetune_epochs=0
    )
    report = run(config)
    rows = report["results"]
    assert report["config"]["criterion"] == METHOD_SETTINGS[method][0]
    assert rows["pruned"]["macs"] < rows["base"]["macs"]
    assert rows["pruned"]["test_accuracy"] > 0.5
    _, _, meta = checkpoint.load_model_file(tmp_path / "pruned.msgpack")
    assert len(meta["keep"]["conv2"]) < 16
    assert (tmp_path / method / "pruned.msgpack").is_file()
